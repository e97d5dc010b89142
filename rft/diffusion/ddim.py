"""DDIM sampling with per-step Gaussian log-probs: the rollout every RL objective uses.

One DDIM transition (Song et al. 2021, Eq. 12), with ab = alphas_cumprod:

  x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)            (optionally clipped)
  sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)   (Eq. 16)
  mean    = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma_t^2) eps
  x_prev  ~ N(mean, sigma_t^2 I)

eta = 1 is the DDPM ancestral sampler (Ho et al. 2020), eta = 0 deterministic DDIM.
With eta > 0 every transition is a Gaussian policy step, and its log-density

  log p(x_prev | x_t) = sum_d [ -(x_prev - mean)^2 / (2 sigma^2) - log sigma - log(2 pi)/2 ]

is what DDPO (Black et al. 2023) and PRDP treat as the per-step log-prob. It is computed
in float32 and reported both averaged over the latent dims (DDPO's convention) and summed.
Log-probs need eta > 0: with eta = 0 (sigma = 0) they are undefined and come out NaN;
sampling with eta = 0 still works and is deterministic.

The sampler and the trainer share one per-step function (``ddim_step`` with
``prev_sample=`` to score a given transition, after jannerm/ddpo), so recomputing a stored
transition's log-prob with unchanged params reproduces the recorded value exactly
(ratio exp(new - old) == 1.0, bitwise), also inside a jitted value_and_grad. Two details
make that hold under XLA, which contracts a*b+c into FMAs differently per fused kernel:
the log-prob is computed in a custom-VJP "island" whose intermediates feed nothing else,
and the per-dim mean is a sum of pre-scaled terms (no trailing multiply to contract into
the consumer's subtraction). Pass stored latents / timesteps to jitted code as arguments,
not closure constants: XLA constant-folds constants with different rounding.
The log-prob is differentiable in reverse mode only (custom VJP).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rft.diffusion.guidance import EpsFn, guided_eps, timesteps_vector
from rft.diffusion.schedules import Schedule, _per_example

_HALF_LOG_2PI = 0.5 * float(np.log(2.0 * np.pi))


def _is_static_zero(v) -> bool:
  return isinstance(v, (int, float)) and v == 0


# --------------------------------------------------------------------------- timesteps


def ddim_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int = 1):
  """Diffusers DDIMScheduler "leading" spacing; returns (timesteps, prev_timesteps) int32 [S].

  step_ratio = T // num_steps; timesteps = (arange(num_steps) * step_ratio)[::-1] +
  steps_offset; prev_t = t - step_ratio. E.g. T=1000, 50 steps, offset 1:
  t = [981, 961, ..., 1], prev_t = [961, ..., 1, -19].

  The last prev_t is negative. Its alpha_bar is taken as ``alphas_cumprod[0]`` (SD's
  ``set_alpha_to_one=False``), not 1, so with steps_offset >= 1 and eta > 0 every
  transition, the final one included, has strictly positive variance and a finite
  log-prob. (With steps_offset = 0 the final transition goes from t=0 to alpha_bar[0]
  and has zero variance.)
  """
  T, S = int(num_train_timesteps), int(num_steps)
  if not 1 <= S <= T:
    raise ValueError(f"num_steps must be in [1, num_train_timesteps={T}], got {num_steps}")
  step_ratio = T // S
  timesteps = (np.arange(S, dtype=np.int64) * step_ratio)[::-1] + int(steps_offset)
  if timesteps[0] >= T or timesteps[-1] < 0:
    raise ValueError(
        f"steps_offset={steps_offset} with num_steps={S} gives timesteps "
        f"[{timesteps[0]}..{timesteps[-1]}] outside [0, {T})")
  prev_timesteps = timesteps - step_ratio
  return timesteps.astype(np.int32), prev_timesteps.astype(np.int32)


def _alpha_bars(schedule: Schedule, t, prev_t):
  """(alpha_bar_t, alpha_bar_prev); a negative prev_t maps to alphas_cumprod[0]."""
  ac = schedule.alphas_cumprod
  t = jnp.asarray(t, jnp.int32)
  prev_t = jnp.asarray(prev_t, jnp.int32)
  ab_t = ac[t]
  ab_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], ac[0])
  return ab_t, ab_prev


def ddim_sigma(schedule: Schedule, t, prev_t, eta) -> jax.Array:
  """sigma_t = eta * sqrt((1 - ab_prev)/(1 - ab_t) * (1 - ab_t/ab_prev)) (DDIM Eq. 16), float32."""
  ab_t, ab_prev = _alpha_bars(schedule, t, prev_t)
  return jnp.asarray(eta, jnp.float32) * jnp.sqrt(_ddim_variance(ab_t, ab_prev))


def _ddim_variance(ab_t, ab_prev):
  """(1 - ab_prev)/(1 - ab_t) * (1 - ab_t/ab_prev), written as (ab_prev - ab_t)/ab_prev.

  The factor 1 - ab_t/ab_prev is ~1e-4 at the last steps; computed as written it loses
  ~4 digits to cancellation in float32, and then any compiler rewrite (a/b -> a*(1/b))
  moves the log-prob by ~1e-3. ab_prev - ab_t is exact for nearby values (Sterbenz).
  """
  return (1.0 - ab_prev) / (1.0 - ab_t) * ((ab_prev - ab_t) / ab_prev)


# --------------------------------------------------------------------------- one step


def predicted_x0(schedule: Schedule, eps: jax.Array, t, x_t: jax.Array,
                 clip_x0: Optional[float] = None) -> jax.Array:
  """x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), optionally clipped (float32).

  The denoiser's estimate of E[x0 | x_t]: a function of x_t alone, which is what makes a
  reward of it a valid per-step baseline (rft.objectives.step_baselines).
  """
  x = x_t.astype(jnp.float32)
  ab_t = _per_example(schedule.alphas_cumprod[timesteps_vector(t, x.shape[0])], x.ndim)
  x0 = (x - jnp.sqrt(1.0 - ab_t) * eps.astype(jnp.float32)) / jnp.sqrt(ab_t)
  return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def _mean_and_sigma(x, e, ab_t, ab_prev, eta, clip_x0):
  """DDIM Eq. 12 mean and sigma_t (Eq. 16) in float32 from x_t, eps and the alpha_bars."""
  sigma = eta * jnp.sqrt(_ddim_variance(ab_t, ab_prev))
  x0_pred = (x - jnp.sqrt(1.0 - ab_t) * e) / jnp.sqrt(ab_t)
  if clip_x0 is not None:
    x0_pred = jnp.clip(x0_pred, -clip_x0, clip_x0)
  # Clamped at 0 only against rounding (and eta > 1, where DDIM is not defined).
  dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_prev - jnp.square(sigma), 0.0))
  mean = jnp.sqrt(ab_prev) * x0_pred + dir_coef * e
  return mean, sigma


def _log_prob_plain(clip_x0, x, e, ab_t, ab_prev, eta, prev):
  """Per-example (mean, sum) over non-batch dims of the Gaussian transition log-density."""
  mean, sigma = _mean_and_sigma(x, e, ab_t, ab_prev, eta, clip_x0)
  diff = jax.lax.stop_gradient(prev) - mean
  log_prob = -jnp.square(diff) / (2.0 * jnp.square(sigma)) - jnp.log(sigma) - _HALF_LOG_2PI
  axes = tuple(range(1, x.ndim))
  # The mean is a sum of pre-scaled terms, not sum * (1/N): a trailing multiply would be
  # contracted into an FMA with whatever consumes it (e.g. new - old in a ratio), so the
  # trainer would see a different rounding of the "same" value than the sampler stored.
  inv_n = np.float32(1.0 / np.prod(x.shape[1:]))
  return jnp.sum(log_prob * inv_n, axis=axes), jnp.sum(log_prob, axis=axes)


# Why an island: XLA fuses elementwise code differently depending on what else consumes
# the intermediates (e.g. a backward pass), and LLVM then contracts a*b+c into an FMA in
# some kernels but not others, so the "same" log-prob can differ by an ulp between the
# sampler's program and the trainer's jitted grad step (and latents of size ~100 turn an
# ulp of the mean into ~1e-4 of log-prob). Here the log-prob is computed behind
# optimization barriers from its inputs alone, its intermediates feed nothing else (the
# VJP recomputes them behind its own barrier instead of reusing them), so every program
# compiles it to the same code: sampled == recomputed, bitwise.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _log_prob_island(clip_x0, x, e, ab_t, ab_prev, eta, prev):
  inputs = jax.lax.optimization_barrier((x, e, ab_t, ab_prev, eta, prev))
  return jax.lax.optimization_barrier(_log_prob_plain(clip_x0, *inputs))


def _log_prob_island_fwd(clip_x0, *inputs):
  return _log_prob_island(clip_x0, *inputs), inputs


def _log_prob_island_bwd(clip_x0, inputs, g):
  inputs = jax.lax.optimization_barrier(inputs)
  _, vjp = jax.vjp(functools.partial(_log_prob_plain, clip_x0), *inputs)
  return vjp(g)


_log_prob_island.defvjp(_log_prob_island_fwd, _log_prob_island_bwd)


def ddim_step(schedule: Schedule, eps: jax.Array, t, prev_t, x_t: jax.Array, eta, *,
              key: Optional[jax.Array] = None, prev_sample: Optional[jax.Array] = None,
              clip_x0: Optional[float] = None, log_prob: bool = True):
  """One DDIM transition x_t -> x_prev; returns (prev_sample, log_prob_mean, log_prob_sum).

  eps, x_t: [B, ...]; t, prev_t: Python ints or int arrays, scalar or [B]; eta >= 0
  (float or traced). If ``prev_sample`` is None, samples mean + sigma * N(0, I) with
  ``key`` (key unused and optional when eta is the Python number 0); otherwise scores the
  given prev_sample. The whole step runs in float32; prev_sample is returned in x_t's
  dtype and the log-prob is always that of the returned (cast) sample.

  log_prob_mean / log_prob_sum: [B] float32, the per-dim Gaussian log-density averaged /
  summed over all non-batch dims; NaN when sigma = 0 (eta = 0). Gradients flow to eps and
  x_t (reverse mode only); the scored sample is treated as data (stop_gradient), as in
  DDPO. The sample itself is differentiable through the mean (reward backprop).
  log_prob=False skips the log-prob (returned as None): reward backprop and eta = 0
  sampling need only the sample, and at eta = 0 the log-prob's VJP would be NaN.
  """
  f32 = jnp.float32
  x = x_t.astype(f32)
  e = eps.astype(f32)
  batch = x.shape[0]
  # Always per-example [B] alpha_bars, so a scalar t (sampler) and a [B] t (trainer)
  # build the same graph.
  ab_t, ab_prev = _alpha_bars(schedule, timesteps_vector(t, batch),
                              timesteps_vector(prev_t, batch))
  ab_t = _per_example(ab_t, x.ndim)
  ab_prev = _per_example(ab_prev, x.ndim)
  eta_f = jnp.asarray(eta, f32)

  if prev_sample is None:
    mean, sigma = _mean_and_sigma(x, e, ab_t, ab_prev, eta_f, clip_x0)
    if _is_static_zero(eta):
      sample = mean
    else:
      if key is None:
        raise ValueError("ddim_step: sampling with eta != 0 needs a PRNG `key`")
      sample = mean + sigma * jax.random.normal(key, x.shape, f32)
    prev_sample = sample.astype(x_t.dtype)
  elif prev_sample.shape != x_t.shape:
    raise ValueError(f"prev_sample shape {prev_sample.shape} != x_t shape {x_t.shape}")

  if not log_prob:
    return prev_sample, None, None
  lp_mean, lp_sum = _log_prob_island(clip_x0, x, e, ab_t, ab_prev, eta_f,
                                     prev_sample.astype(f32))
  return prev_sample, lp_mean, lp_sum


def _denoise_step(eps_fn, params, x_t, t, prev_t, cond, null_cond, schedule, eta,
                  guidance_scale, clip_x0, key=None, prev_sample=None, log_prob=True,
                  return_eps=False):
  """The one per-step function shared by the sampler and every log-prob recompute:
  (prev_sample, lp_mean, lp_sum), plus the guided eps with return_eps."""
  eps = guided_eps(eps_fn, params, x_t, t, cond, null_cond, guidance_scale)
  out = ddim_step(schedule, eps, t, prev_t, x_t, eta, key=key, prev_sample=prev_sample,
                  clip_x0=clip_x0, log_prob=log_prob)
  return out + (eps,) if return_eps else out


# --------------------------------------------------------------------------- sampler


@struct.dataclass
class Trajectory:
  """A sampled DDIM chain.

  latents: [B, S+1, ...] (x_T first, final sample last); timesteps / prev_timesteps:
  [S] int32 (the t and prev_t of each transition); log_probs / log_probs_sum: [B, S]
  float32 log p(latents[:, i+1] | latents[:, i]) averaged / summed over latent dims;
  x0_preds: None, or [B, S, ...] the sampler's x0 prediction at latents[:, i].
  """

  latents: jax.Array
  timesteps: jax.Array
  prev_timesteps: jax.Array
  log_probs: jax.Array
  log_probs_sum: jax.Array
  # [B, S, ...]: the (clipped) x0 prediction at each transition's input x_t, recorded
  # with ``record_x0=True`` (per-step value baselines, rft.objectives.step_baselines).
  x0_preds: Optional[jax.Array] = None

  @property
  def sample(self) -> jax.Array:
    return self.latents[:, -1]

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[-1]


def ddim_sample(eps_fn: EpsFn, params: Any, x_T: jax.Array, cond: Any, null_cond: Any, *,
                schedule: Schedule, num_steps: int, eta=1.0, guidance_scale=1.0,
                key: Optional[jax.Array] = None, clip_x0: Optional[float] = None,
                steps_offset: int = 1, record_x0: bool = False) -> Trajectory:
  """Runs num_steps DDIM transitions from x_T with CFG, recording latents and log-probs.

  One ``jax.lax.scan`` over steps; step i uses ``jax.random.split(key, num_steps)[i]``.
  Static: eps_fn, num_steps, steps_offset, clip_x0, record_x0. eta and guidance_scale may
  be traced (a Python 1.0 guidance scale skips the unconditional pass). key may be None
  only when eta is the Python number 0 (deterministic DDIM; log_probs are then NaN).
  record_x0 also keeps each step's x0 prediction (``Trajectory.x0_preds``); it costs no
  extra denoiser call and leaves the latents and log-probs unchanged.
  """
  timesteps, prev_timesteps = ddim_timesteps(schedule.num_train_timesteps, num_steps,
                                             steps_offset)
  if key is None:
    if not _is_static_zero(eta):
      raise ValueError("ddim_sample: eta != 0 needs a PRNG `key`")
    keys = None
  else:
    keys = jax.random.split(key, num_steps)

  def body(x, step):
    t, prev_t, k = step
    x_prev, lp_mean, lp_sum, eps = _denoise_step(eps_fn, params, x, t, prev_t, cond,
                                                 null_cond, schedule, eta, guidance_scale,
                                                 clip_x0, key=k, return_eps=True)
    x0 = predicted_x0(schedule, eps, t, x, clip_x0) if record_x0 else None
    return x_prev, (x_prev, lp_mean, lp_sum, x0)

  xs = (jnp.asarray(timesteps), jnp.asarray(prev_timesteps), keys)
  _, (chain, lp_mean, lp_sum, x0) = jax.lax.scan(body, x_T, xs)
  latents = jnp.concatenate([x_T[None], chain], axis=0)
  return Trajectory(latents=jnp.moveaxis(latents, 0, 1),
                    timesteps=jnp.asarray(timesteps),
                    prev_timesteps=jnp.asarray(prev_timesteps),
                    log_probs=lp_mean.T, log_probs_sum=lp_sum.T,
                    x0_preds=None if x0 is None else jnp.moveaxis(x0, 0, 1))


# --------------------------------------------------------------------------- recompute


def transition_log_prob(eps_fn: EpsFn, params: Any, x_t: jax.Array, x_prev: jax.Array,
                        t, prev_t, cond: Any, null_cond: Any, *, schedule: Schedule, eta,
                        guidance_scale=1.0, clip_x0: Optional[float] = None):
  """Log-prob of stored transitions x_t -> x_prev under ``params``: (mean [B], sum [B]).

  The trainer's side of DDPO / PRDP: t, prev_t are ints or int arrays (scalar or [B], so
  a minibatch may mix steps). Shares ``ddim_step`` with the sampler; eta, guidance_scale,
  clip_x0 must be those used for sampling for the ratio exp(new - old) to be 1 at
  unchanged params. Differentiable w.r.t. params.
  """
  _, lp_mean, lp_sum = _denoise_step(eps_fn, params, x_t, t, prev_t, cond, null_cond,
                                     schedule, eta, guidance_scale, clip_x0,
                                     prev_sample=x_prev)
  return lp_mean, lp_sum


def trajectory_log_probs(eps_fn: EpsFn, params: Any, traj: Trajectory, cond: Any,
                         null_cond: Any, *, schedule: Schedule, eta, guidance_scale=1.0,
                         clip_x0: Optional[float] = None, reduce: str = "mean") -> jax.Array:
  """Recomputes every step's log-prob of ``traj`` under ``params``: [B, S] float32.

  A ``jax.lax.scan`` over the step axis running the sampler's own per-step function, so
  with the sampling params the result equals ``traj.log_probs`` (reduce="mean") or
  ``traj.log_probs_sum`` (reduce="sum") exactly.
  """
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
  lat = jnp.moveaxis(traj.latents, 1, 0)  # [S+1, B, ...]

  def body(carry, step):
    x_t, x_prev, t, prev_t = step
    _, lp_mean, lp_sum = _denoise_step(eps_fn, params, x_t, t, prev_t, cond, null_cond,
                                       schedule, eta, guidance_scale, clip_x0,
                                       prev_sample=x_prev)
    return carry, (lp_mean if reduce == "mean" else lp_sum)

  _, lps = jax.lax.scan(body, None, (lat[:-1], lat[1:], traj.timesteps, traj.prev_timesteps))
  return lps.T
