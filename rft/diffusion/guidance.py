"""Classifier-free guidance (Ho & Salimans 2022).

eps_guided = eps(x, t, null) + s * (eps(x, t, cond) - eps(x, t, null)).

A denoiser is any ``eps_fn(params, x_t, t, cond) -> eps`` with x_t ``[B, ...]``, t int32
``[B]`` (float32 for flow models) and cond a pytree whose leaves have leading batch dim B.
The combination is linear, so it applies unchanged to other model outputs (v, flow
velocity): the samplers guide the raw model output and convert it afterwards
(rft.diffusion.sampling).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

EpsFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def broadcast_batch(tree: Any, batch_size: int) -> Any:
  """Broadcasts every leaf of ``tree`` (leading dim 1 or batch_size) to leading dim batch_size."""
  def bcast(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.ndim == 0 or leaf.shape[0] not in (1, batch_size):
      raise ValueError(
          f"null_cond leaf of shape {leaf.shape} must have leading batch dim 1 or "
          f"{batch_size}")
    return jnp.broadcast_to(leaf, (batch_size,) + leaf.shape[1:])
  return jax.tree_util.tree_map(bcast, tree)


def timesteps_vector(t, batch_size: int) -> jax.Array:
  """A scalar or [B] timestep as a vector [B]: int32 for integer (DDPM) timesteps,
  float32 for floating ones (flow models' sigma * 1000, which must not be truncated)."""
  t = jnp.asarray(t)
  t = t.astype(jnp.float32 if jnp.issubdtype(t.dtype, jnp.floating) else jnp.int32)
  return jnp.broadcast_to(t, (batch_size,))


def guided_eps(eps_fn: EpsFn, params: Any, x: jax.Array, t, cond: Any, null_cond: Any,
               guidance_scale) -> jax.Array:
  """CFG noise prediction eps_u + s (eps_c - eps_u).

  Uncond and cond predictions come from ONE ``eps_fn`` call on the concatenated batch
  [x; x] with conditioning [null_cond; cond] (null_cond broadcast to B). When
  ``guidance_scale`` is the Python number 1.0 the uncond half is skipped and eps_fn runs
  once on ``cond`` only (null_cond may then be None). A traced scale always runs both.
  """
  batch = x.shape[0]
  t = timesteps_vector(t, batch)
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
    return eps_fn(params, x, t, cond)
  if null_cond is None:
    raise ValueError(
        f"guided_eps: null_cond is None but guidance_scale={guidance_scale!r} != 1.0 "
        "needs the unconditional prediction")
  null = broadcast_batch(null_cond, batch)
  both_cond = jax.tree_util.tree_map(lambda n, c: jnp.concatenate([n, c], 0), null, cond)
  eps = eps_fn(params, jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both_cond)
  eps_u, eps_c = eps[:batch], eps[batch:]
  return eps_u + jnp.asarray(guidance_scale, eps.dtype) * (eps_c - eps_u)
