"""Denoising (eps-prediction) training loss for diffusion models.

L = E_{t, x0, eps} [ w(t) || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t, c) ||^2 ]
(Ho et al. 2020, "simple" loss, averaged over pixels), with t ~ U{0..T-1},
classifier-free-guidance conditioning dropout (Ho & Salimans 2022: each example's c is
replaced by the null condition with probability p) and optional min-SNR-gamma weighting
(Hang et al. 2023): for eps prediction w(t) = min(SNR_t, gamma) / SNR_t,
SNR_t = ab_t / (1 - ab_t).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from rft.diffusion.guidance import EpsFn, broadcast_batch
from rft.diffusion.schedules import Schedule, add_noise, snr


def drop_cond(cond: Any, null_cond: Any, drop: jax.Array) -> Any:
  """Per-example select: null_cond (leading dim 1 or B) where drop [B] is True, else cond."""
  batch = drop.shape[0]
  null = broadcast_batch(null_cond, batch)

  def select(c, n):
    mask = drop.reshape((batch,) + (1,) * (c.ndim - 1))
    return jnp.where(mask, n, c)

  return jax.tree_util.tree_map(select, cond, null)


def eps_loss(eps_fn: EpsFn, params: Any, x0: jax.Array, cond: Any, null_cond: Any,
             rng: jax.Array, schedule: Schedule, cond_dropout=0.1,
             snr_gamma: Optional[float] = None, high_noise_frac: float = 0.0,
             high_noise_start: float = 0.85, x0_weight_cap: float = 0.0):
  """Eps-prediction MSE on one batch; returns (scalar float32 loss, metrics dict).

  x0: clean data [B, ...]; cond: pytree with leading dim B; null_cond: pytree with
  leading dim 1 or B (may be None when cond_dropout is the Python number 0).
  Per example the squared error is averaged over all non-batch dims, weighted by the
  min-SNR weight when ``snr_gamma`` is given, then averaged over the batch.
  Metrics: "loss", "mse" (unweighted), "cond_dropout_frac" (fraction of examples dropped).
  Pure and jittable (cond_dropout may be traced; snr_gamma is static).

  High-noise emphasis (both off by default): with probability ``high_noise_frac`` an
  example's t is drawn uniformly from [high_noise_start · T, T) instead of [0, T); with
  ``x0_weight_cap`` > 0 each example's error is weighted by min(1 / ᾱ_t, cap), divided by
  the batch mean of the weights. 1/ᾱ_t turns the eps error into the x0 error's scale
  (‖x̂0 − x0‖² = (1 − ᾱ)/ᾱ ‖ε̂ − ε‖²): under the plain eps loss the examples whose noise
  hides the layout carry almost no weight, and a model trained on it ignores position
  words (measured on ShapesWorld, README "Where the headroom is").
  """
  batch = x0.shape[0]
  no_dropout = isinstance(cond_dropout, (int, float)) and cond_dropout == 0
  if not no_dropout:
    if null_cond is None:
      raise ValueError(f"eps_loss: cond_dropout={cond_dropout!r} needs a null_cond, got None")
    null_cond = broadcast_batch(null_cond, batch)  # checks leading dims before any work

  t_key, noise_key, drop_key = jax.random.split(rng, 3)
  T = schedule.num_train_timesteps
  t = jax.random.randint(t_key, (batch,), 0, T, dtype=jnp.int32)
  if high_noise_frac:
    k_hi, k_pick = jax.random.split(jax.random.fold_in(t_key, 1))
    t_hi = jax.random.randint(k_hi, (batch,), int(high_noise_start * T), T, dtype=jnp.int32)
    t = jnp.where(jax.random.uniform(k_pick, (batch,)) < high_noise_frac, t_hi, t)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32).astype(x0.dtype)
  x_t = add_noise(schedule, x0, noise, t)

  if no_dropout:
    drop = jnp.zeros((batch,), bool)
  else:
    drop = jax.random.bernoulli(drop_key, cond_dropout, (batch,))
    cond = drop_cond(cond, null_cond, drop)

  eps = eps_fn(params, x_t, t, cond)
  if eps.shape != x0.shape:
    raise ValueError(f"eps_fn returned shape {eps.shape}, expected x0's shape {x0.shape}")
  err = jnp.square(eps.astype(jnp.float32) - noise.astype(jnp.float32))
  per_example = jnp.mean(err.reshape(batch, -1), axis=1)
  mse = jnp.mean(per_example)
  weight = jnp.ones_like(per_example)
  if snr_gamma is not None:
    s = snr(schedule, t)
    weight = weight * jnp.minimum(s, jnp.float32(snr_gamma)) / s
  if x0_weight_cap:
    w0 = jnp.minimum(1.0 / schedule.alphas_cumprod[t], jnp.float32(x0_weight_cap))
    weight = weight * w0 / jnp.mean(w0)
  loss = mse if (snr_gamma is None and not x0_weight_cap) else jnp.mean(weight * per_example)
  metrics = {"loss": loss, "mse": mse,
             "cond_dropout_frac": jnp.mean(drop.astype(jnp.float32))}
  return loss, metrics
