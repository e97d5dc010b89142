"""Text-to-image sampling pipeline: tokens -> text states -> CFG DDIM with log-probs.

The rollout every online objective uses. For pixel-space models (ShapesWorld) the
final latent is the image; latent-space models add a decoder on top.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rft.diffusion import ddim
from rft.diffusion.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  num_steps: int = 20
  eta: float = 1.0
  guidance_scale: float = 3.0
  clip_x0: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class Text2ImagePipeline:
  """encode(params, tokens) -> cond; eps_fn(params, x, t, cond) -> eps."""

  encode: Callable[[Any, jax.Array], Any]
  eps_fn: Callable
  schedule: Schedule
  sample_shape: tuple[int, ...]  # per-example latent shape, e.g. (16, 16, 3)

  def conditions(self, params, tokens):
    """(cond for each prompt, null cond of the empty prompt with batch dim 1)."""
    cond = self.encode(params, tokens)
    null = self.encode(params, jnp.zeros_like(tokens[:1]))
    return cond, null

  def sample(self, params, tokens, key, cfg: SamplerConfig) -> tuple[ddim.Trajectory, Any, Any]:
    """Sample one trajectory per row of `tokens`: (trajectory, cond, null_cond)."""
    cond, null = self.conditions(params, tokens)
    k_init, k_steps = jax.random.split(key)
    x_T = jax.random.normal(k_init, (tokens.shape[0], *self.sample_shape), jnp.float32)
    traj = ddim.ddim_sample(self.eps_fn, params, x_T, cond, null, schedule=self.schedule,
                            num_steps=cfg.num_steps, eta=cfg.eta,
                            guidance_scale=cfg.guidance_scale, key=k_steps, clip_x0=cfg.clip_x0)
    return traj, cond, null


def shapes_pipeline(model, schedule: Schedule, image_size: int = 16) -> Text2ImagePipeline:
  from rft.models.t2i import make_encode_fn, make_eps_fn
  return Text2ImagePipeline(make_encode_fn(model), make_eps_fn(model), schedule,
                            (image_size, image_size, 3))
