"""Differentiable image-statistics rewards (pure jax, jittable).

Images x in [-1, 1] are first mapped to y = (x + 1) / 2, clipped to [0, 1], with
channels (R, G, B). Per image, averaged over the H*W pixels:

    saturation = mean_p (max_c y_pc - min_c y_pc) / (max_c y_pc + eps)     in [0, 1]
    brightness = mean_p (0.299 R_p + 0.587 G_p + 0.114 B_p)                in [0, 1]

saturation is HSV saturation (0 for greys, 1 for pure hues; eps keeps black finite);
brightness is Rec.601 luma.
"""
from __future__ import annotations

import jax.numpy as jnp

from rft.rewards.base import Reward, register

SATURATION_EPS = 1e-6
LUMA_601 = (0.299, 0.587, 0.114)


def _unit(images) -> jnp.ndarray:
  return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def saturation(images, eps: float = SATURATION_EPS) -> jnp.ndarray:
  """[B]: mean over pixels of (max_c - min_c) / (max_c + eps), images [B,H,W,3] in [-1, 1]."""
  y = _unit(images)
  hi, lo = y.max(-1), y.min(-1)
  return ((hi - lo) / (hi + eps)).mean(axis=(1, 2))


def brightness(images) -> jnp.ndarray:
  """[B]: mean over pixels of 0.299 R + 0.587 G + 0.114 B, images [B,H,W,3] in [-1, 1]."""
  return (_unit(images) @ jnp.asarray(LUMA_601, jnp.float32)).mean(axis=(1, 2))


@register("saturation")
def saturation_reward() -> Reward:
  """Mean HSV saturation in [0, 1] (differentiable)."""
  return Reward("saturation", lambda images, prompts: saturation(images), differentiable=True)


@register("brightness")
def brightness_reward() -> Reward:
  """Mean Rec.601 luma in [0, 1] (differentiable)."""
  return Reward("brightness", lambda images, prompts: brightness(images), differentiable=True)
