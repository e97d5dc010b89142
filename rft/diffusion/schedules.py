"""Discrete-time noise schedules for eps-prediction diffusion models.

A schedule is the sequence beta_0..beta_{T-1} of the DDPM forward process
(Ho et al. 2020), q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), and its
cumulative product alpha_bar_t = prod_{s<=t} (1 - beta_s), which gives the closed form
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

Timesteps are 0-based: index t in [0, num_train_timesteps) has noise level alphas_cumprod[t]
(the diffusers convention, so SD checkpoints see the same t they were trained with).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")


@struct.dataclass
class Schedule:
  """Betas and alpha_bar (float32, length num_train_timesteps); a pytree with T static."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  num_train_timesteps: int = struct.field(pytree_node=False)


def _cosine_betas(num_train_timesteps: int, s: float = 0.008,
                  max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021 Eq. 17: alpha_bar(u) = cos((u + s)/(1 + s) * pi/2)^2, u = t/T.

  beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)  (their Eq. 17 + clip).
  """
  def alpha_bar(u):
    return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

  T = num_train_timesteps
  return np.array([min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)
                   for i in range(T)], dtype=np.float64)


def make_schedule(name: str, num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001, beta_end: float = 0.02) -> Schedule:
  """Builds a named schedule.

  * "linear": beta = linspace(beta_start, beta_end, T) (DDPM, Ho et al. 2020).
  * "scaled_linear": beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Stable
    Diffusion, with beta_start=0.00085, beta_end=0.012).
  * "cosine": Nichol & Dhariwal 2021 with s=0.008, betas clipped to <= 0.999;
    beta_start / beta_end are ignored.

  Computed in float64 with numpy, stored as float32.
  """
  T = int(num_train_timesteps)
  if T < 1:
    raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
  elif name == "scaled_linear":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
  elif name == "cosine":
    betas = _cosine_betas(T)
  else:
    raise ValueError(f"Unknown schedule name {name!r}; expected one of {SCHEDULE_NAMES}")
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
                  num_train_timesteps=T)


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a scalar or [B] vector so it broadcasts against a [B, ...] array of rank ndim."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
  """Forward process sample x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

  t: int scalar or int [B]. Computed in float32, returned in x0's dtype.
  """
  ab = _per_example(schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)], x0.ndim)
  x_t = (jnp.sqrt(ab) * x0.astype(jnp.float32)
         + jnp.sqrt(1.0 - ab) * noise.astype(jnp.float32))
  return x_t.astype(x0.dtype)


def snr(schedule: Schedule, t) -> jax.Array:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t."""
  ab = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
  return ab / (1.0 - ab)
