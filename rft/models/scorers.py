"""ShapesWorld attribute classifiers: per-cell occupancy, colour, shape and size.

Two independent architectures, trained only on rendered images (rft.train.scorers):
* `CellCNN` -- a whole-image conv net pooled to the 2x2 cell grid (the reward model).
* `CropCNN` -- a conv net applied to each cell's crop with a margin (the evaluator).
Both return factored logits {"occupied", "color", "shape", "size"}, each [B, cells, n].
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from rft.data import shapes


class _Heads(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, h):
    h = nn.gelu(nn.Dense(self.hidden)(h))
    return {
        "occupied": nn.Dense(2, name="occupied")(h),
        "color": nn.Dense(len(shapes.COLORS), name="color")(h),
        "shape": nn.Dense(len(shapes.SHAPES), name="shape")(h),
        "size": nn.Dense(len(shapes.SIZES), name="size")(h),
    }


class CellCNN(nn.Module):
  """Conv stack over the whole image, average-pooled to one feature per cell."""

  widths: Sequence[int] = (32, 64, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, 3] in [-1, 1]
    h = x
    for i, w in enumerate(self.widths):
      h = nn.gelu(nn.Conv(w, (3, 3))(h))
      h = nn.gelu(nn.Conv(w, (3, 3))(h))
      if i < len(self.widths) - 1:
        h = nn.avg_pool(h, (2, 2), (2, 2))
    b, hh, ww, d = h.shape
    g = shapes.GRID
    h = h.reshape(b, g, hh // g, g, ww // g, d).mean(axis=(2, 4)).reshape(b, g * g, d)
    return _Heads(self.hidden)(h)


class CropCNN(nn.Module):
  """The same small conv net on every cell's crop (cell plus `margin` pixels)."""

  widths: Sequence[int] = (16, 32)
  hidden: int = 96
  margin: int = 2

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    m, cell, g = self.margin, shapes.CELL, shapes.GRID
    xp = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=-1.0)
    crops = [xp[:, r * cell:(r + 1) * cell + 2 * m, c * cell:(c + 1) * cell + 2 * m]
             for r in range(g) for c in range(g)]
    h = jnp.stack(crops, 1).reshape(b * g * g, cell + 2 * m, cell + 2 * m, x.shape[-1])
    h = nn.gelu(nn.Conv(self.widths[0], (3, 3))(h))
    for w in self.widths[1:]:
      h = nn.gelu(nn.Conv(w, (3, 3), strides=(2, 2))(h))
      h = nn.gelu(nn.Conv(w, (3, 3))(h))
    h = h.reshape(b, g * g, -1)
    return _Heads(self.hidden)(h)


ARCHITECTURES = {"cell_cnn": CellCNN, "crop_cnn": CropCNN}


def make_scorer(arch: str, **kwargs) -> nn.Module:
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown scorer architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[arch](**kwargs)
