"""JPEG compressibility and incompressibility (DDPO, Black et al. 2023).

Each image is encoded with real JPEG (PIL) and scored by its file size:

    incompressibility(x) = size_kB(JPEG_q(u8(x)))      compressibility(x) = -size_kB(...)

with u8(x) = round(clip((x + 1) * 127.5, 0, 255)) for x in [-1, 1], size_kB =
bytes / 1000 and q the JPEG quality (95 as in DDPO). These are host rewards: numpy
code run outside jit, and not differentiable.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rft.rewards.base import Reward, register


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] (numpy or jax) -> uint8 [B, H, W, 3]."""
  x = np.asarray(images, np.float32)
  return np.round(np.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def jpeg_size_kb(images, quality: int = 95) -> np.ndarray:
  """float32 [B]: JPEG file size in kB (1 kB = 1000 bytes) of each image [B, H, W, 3]."""
  u8 = to_uint8(images)
  if u8.ndim != 4 or u8.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {u8.shape}")
  out = np.empty(len(u8), np.float32)
  for i, img in enumerate(u8):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    out[i] = buf.tell() / 1000.0
  return out


@register("jpeg_incompressibility")
def jpeg_incompressibility_reward(quality: int = 95) -> Reward:
  """JPEG size in kB at `quality` (host, not differentiable): larger is better."""
  return Reward("jpeg_incompressibility", lambda images, prompts: jpeg_size_kb(images, quality),
                differentiable=False, host=True)


@register("jpeg_compressibility")
def jpeg_compressibility_reward(quality: int = 95) -> Reward:
  """Minus the JPEG size in kB at `quality` (host, not differentiable): smaller files are better."""
  return Reward("jpeg_compressibility", lambda images, prompts: -jpeg_size_kb(images, quality),
                differentiable=False, host=True)
