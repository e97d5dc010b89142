"""DDIM transitions with per-step Gaussian log-probs (the "ddim" sampler plug-in).

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
``prev_sample=`` to score a given transition, after jannerm/ddpo; the rollouts over it
are in rft.diffusion.sampling, `DDIMSampler` below plugs it in), so recomputing a stored
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

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rft.diffusion.guidance import timesteps_vector
from rft.diffusion.schedules import Schedule, _per_example, add_noise

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


# --------------------------------------------------------------------------- sampler


def v_to_eps(v, x_t, alphas_cumprod_t):
  """eps from a v-prediction (Salimans & Ho 2022): v = sqrt(ab) eps - sqrt(1-ab) x0, so
  eps = sqrt(ab) v + sqrt(1 - ab) x_t. ``alphas_cumprod_t`` is per example [B]."""
  ab = alphas_cumprod_t.astype(jnp.float32).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return (jnp.sqrt(ab) * v.astype(jnp.float32)
          + jnp.sqrt(1.0 - ab) * x_t.astype(jnp.float32)).astype(v.dtype)


PREDICTIONS = ("eps", "v")


@dataclasses.dataclass(frozen=True)
class DDIMSampler:
  """DDIM as a sampler plug-in (rft.diffusion.sampling).

  prediction: what the model outputs, "eps" or "v" (converted to eps after guidance, as
  diffusers' DDIMScheduler does). eta may be a Python number or traced; clip_x0 None
  leaves x0 predictions unclipped.
  """
  schedule: Schedule
  eta: Any = 1.0
  clip_x0: Optional[float] = None
  steps_offset: int = 1
  prediction: str = "eps"

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"DDIM takes model predictions {PREDICTIONS}, got {self.prediction!r}")

  @classmethod
  def build(cls, schedule: Schedule, *, eta=1.0, clip_x0: Optional[float] = None,
            prediction: str = "eps"):
    return cls(schedule, eta, clip_x0, prediction=prediction)

  def timesteps(self, num_steps: int):
    return ddim_timesteps(self.schedule.num_train_timesteps, num_steps, self.steps_offset)

  def eps(self, model_out, t, x):
    """The model output as an eps prediction."""
    if self.prediction == "eps":
      return model_out
    t = timesteps_vector(t, x.shape[0])
    return v_to_eps(model_out, x, self.schedule.alphas_cumprod[t])

  def step(self, model_out, t, t_prev, x, *, key=None, prev_sample=None, log_prob=True):
    x_prev, lp_mean, lp_sum = ddim_step(self.schedule, self.eps(model_out, t, x), t, t_prev, x,
                                        self.eta, key=key, prev_sample=prev_sample,
                                        clip_x0=self.clip_x0, log_prob=log_prob)
    return x_prev, (None if lp_mean is None else (lp_mean, lp_sum))

  def predicted_x0(self, model_out, t, x):
    return predicted_x0(self.schedule, self.eps(model_out, t, x), t, x, self.clip_x0)

  def add_noise(self, x0, noise, t):
    return add_noise(self.schedule, x0, noise, t)
