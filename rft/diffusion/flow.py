"""Rectified flow: the schedule, the Euler ODE and Flow-GRPO SDE samplers, the loss.

Forward process (rectified flow / SD3; Liu et al. 2022, Esser et al. 2024): with
sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps, and the model predicts the
velocity v = eps - x0 at model timestep t = sigma * num_train_timesteps (SD3's
transformer convention). Sampling runs sigma from 1 to 0.

Sigmas (`FlowSchedule.sigmas`) follow diffusers' FlowMatchEulerDiscreteScheduler: n
values linearly spaced in model time from sigma_max to sigma_min of the (shifted)
training grid, divided by num_train_timesteps, then shifted,

    sigma' = shift * sigma / (1 + (shift - 1) * sigma)            (static shift)
    sigma' = e^mu / (e^mu + (1 / sigma - 1))                        (dynamic, exponential)

and a final 0 appended.

Steps (`FlowSampler.step`, dt = sigma_prev - sigma < 0):
  * ODE (eta = 0): x_prev = x + v dt (Euler); deterministic, no log-prob.
  * SDE (Flow-GRPO, Liu et al. 2025, Eq. 8-9): the reverse-time SDE with the flow's
    marginals and noise std sigma_t = a * sqrt(sigma / (1 - sigma)) (a = eta, the paper's
    noise level, 0.7 there; at sigma = 1 the next sigma stands in for sigma in the
    denominator, as the reference code does):

        mean   = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
        x_prev = mean + sigma_t sqrt(-dt) z,  z ~ N(0, I)

    log p(x_prev | x) is the Gaussian density of that step (float32), averaged and summed
    over latent dims like DDIM's, so PPO ratios are exactly 1 on-policy.
  * CPS (coefficient-preserving sampling, Wang & Yu 2025, `kind="cps"`): with
    s = sigma_prev sin(a pi / 2), x_prev = x0_hat (1 - sigma_prev) + eps_hat
    sqrt(sigma_prev^2 - s^2) + s z, where x0_hat = x - sigma v and eps_hat = x + (1 - sigma) v;
    its noise keeps the sample's coefficients on the flow's path. Log-probs are the full
    Gaussian density of that step (std s).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rft.diffusion.guidance import broadcast_batch
from rft.diffusion.training import drop_cond

KINDS = ("sde", "cps")


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
  """FlowMatchEulerDiscreteScheduler's settings (diffusers config names)."""

  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096

  def __post_init__(self):
    if self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
    if self.shift <= 0:
      raise ValueError(f"flow shift must be > 0, got {self.shift}")

  def shift_sigmas(self, sigmas: np.ndarray, mu: Optional[float] = None) -> np.ndarray:
    if self.use_dynamic_shifting:
      if mu is None:
        raise ValueError("a dynamically shifted flow schedule needs mu (see `mu_for`)")
      return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return self.shift * sigmas / (1.0 + (self.shift - 1.0) * sigmas)

  def mu_for(self, image_seq_len: int) -> float:
    """SD3 / FLUX's mu: linear in the image's token count between the base and max."""
    m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
    return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

  def sigmas(self, num_steps: int, mu: Optional[float] = None) -> np.ndarray:
    """[num_steps + 1] float32, from sigma_max down to 0 (the last); the same float32
    values as diffusers (training grid in float32, inference grid and shift in float64)."""
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = self.num_train_timesteps
    train = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / np.float32(n)
    if not self.use_dynamic_shifting:
      train = (np.float32(self.shift) * train / (1 + (np.float32(self.shift) - 1) * train))
    t = np.linspace(float(train[0]) * n, float(train[-1]) * n, num_steps)  # float64
    s = self.shift_sigmas(t / n, mu).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])


@dataclasses.dataclass(frozen=True)
class FlowSampler:
  """Rectified-flow sampler plug-in (rft.diffusion.sampling): model output = velocity.

  eta: Flow-GRPO's noise level a (0: the Euler ODE). kind: "sde" (Flow-GRPO) or "cps".
  clip_x0 clips only the x0 predictions used as per-step value baselines. mu: dynamic
  shifting's mu (schedules with use_dynamic_shifting).
  """

  schedule: FlowSchedule
  eta: Any = 0.7
  clip_x0: Optional[float] = None
  kind: str = "sde"
  mu: Optional[float] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"flow sampler kind must be one of {KINDS}, got {self.kind!r}")

  @property
  def deterministic(self) -> bool:
    """eta the Python number 0: the Euler ODE (no noise, no density)."""
    return isinstance(self.eta, (int, float)) and self.eta == 0

  def timesteps(self, num_steps: int):
    """(t, t_prev) float32 [S]: model timesteps sigma * num_train_timesteps."""
    s = self.schedule.sigmas(num_steps, self.mu) * np.float32(self.schedule.num_train_timesteps)
    return s[:-1], s[1:]

  def _sigma(self, t, x):
    s = jnp.asarray(t, jnp.float32) / self.schedule.num_train_timesteps
    return jnp.broadcast_to(s.reshape(-1), (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))

  def mean_std(self, v, t, t_prev, x):
    """(mean, std) of x_prev given x: std broadcastable to x (0 for the ODE)."""
    v, x = v.astype(jnp.float32), x.astype(jnp.float32)
    sigma, sigma_prev = self._sigma(t, x), self._sigma(t_prev, x)
    dt = sigma_prev - sigma
    if self.deterministic:
      return x + v * dt, jnp.zeros_like(sigma)
    if self.kind == "sde":
      std_t = jnp.sqrt(sigma / (1 - jnp.where(sigma == 1, sigma_prev, sigma))) * self.eta
      mean = (x * (1 + std_t ** 2 / (2 * sigma) * dt)
              + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
      return mean, std_t * jnp.sqrt(-dt)
    s = sigma_prev * jnp.sin(self.eta * jnp.pi / 2)
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    return x0 * (1 - sigma_prev) + eps * jnp.sqrt(sigma_prev ** 2 - s ** 2), s

  def kl_std(self, t, t_prev, x):
    """The per-step noise level the Flow-GRPO reference divides its KL by: the SDE's
    a·sqrt(σ/(1−σ)) (without the sqrt(−dt) of the step's std), CPS's σ_prev·sin(aπ/2)."""
    sigma, sigma_prev = self._sigma(t, x), self._sigma(t_prev, x)
    if self.kind == "sde":
      return jnp.sqrt(sigma / (1 - jnp.where(sigma == 1, sigma_prev, sigma))) * self.eta
    return sigma_prev * jnp.sin(self.eta * jnp.pi / 2)

  def step_kl(self, model_out, ref_out, t, t_prev, x):
    """Flow-GRPO's KL penalty of one step, [B]: mean over dims of (μ_θ − μ_ref)² / 2s²
    with s = kl_std (Liu et al. 2025, their reference code). For the SDE the step's std is
    s·sqrt(−dt), so this is (−dt) times the per-dim KL(N(μ_θ, ·) || N(μ_ref, ·))."""
    if self.deterministic:
      raise ValueError("the step KL needs a stochastic flow sampler (eta > 0)")
    mean, _ = self.mean_std(model_out, t, t_prev, x)
    ref_mean, _ = self.mean_std(ref_out, t, t_prev, x)
    kl = jnp.square(mean - ref_mean) / (2 * jnp.square(self.kl_std(t, t_prev, x)))
    return kl.mean(tuple(range(1, kl.ndim)))

  def step(self, model_out, t, t_prev, x, *, key=None, prev_sample=None, log_prob=True):
    mean, std = self.mean_std(model_out, t, t_prev, x)
    if prev_sample is None:
      if self.deterministic:
        prev_sample = mean
      else:
        if key is None:
          raise ValueError("a stochastic flow step (eta > 0) needs a key")
        prev_sample = mean + std * jax.random.normal(key, x.shape, jnp.float32)
    prev_sample = jax.lax.stop_gradient(jnp.asarray(prev_sample, jnp.float32))
    if not log_prob:
      return prev_sample, None
    if self.deterministic:
      nan = jnp.full((x.shape[0],), jnp.nan, jnp.float32)
      return prev_sample, (nan, nan)
    lp = (-((prev_sample - mean) ** 2) / (2 * std ** 2) - jnp.log(std)
          - 0.5 * math.log(2 * math.pi))
    axes = tuple(range(1, lp.ndim))
    return prev_sample, (lp.mean(axes), lp.sum(axes))

  def predicted_x0(self, model_out, t, x):
    x0 = x.astype(jnp.float32) - self._sigma(t, x) * model_out.astype(jnp.float32)
    return x0 if self.clip_x0 is None else jnp.clip(x0, -self.clip_x0, self.clip_x0)

  def add_noise(self, x0, noise, t):
    sigma = self._sigma(t, x0)
    return (1 - sigma) * x0 + sigma * noise


def factory(kind: str):
  """The registered factory (rft.diffusion.sampling: "flow" = sde, "flow_cps" = cps)."""
  def build(schedule, *, eta=0.7, clip_x0=None, prediction="velocity"):
    if prediction != "velocity":
      raise ValueError(f"the flow sampler needs a velocity model, got prediction {prediction!r}")
    if not isinstance(schedule, FlowSchedule):
      raise ValueError(f"the flow sampler needs a FlowSchedule, got {type(schedule).__name__} "
                       "(a DDPM schedule: use config.sampler.name='ddim')")
    return FlowSampler(schedule, eta, clip_x0, kind)
  return build


# --------------------------------------------------------------------------- training


def sample_sigmas(key, batch: int, weighting: str = "logit_normal", mean: float = 0.0,
                  std: float = 1.0) -> jax.Array:
  """Training noise levels [batch]: "uniform" on (0, 1), or "logit_normal" (SD3's default:
  sigma = sigmoid(n), n ~ N(mean, std^2); Esser et al. 2024, Sec. 3.1)."""
  if weighting == "uniform":
    return jax.random.uniform(key, (batch,), jnp.float32, 1e-5, 1.0)
  if weighting == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
  raise ValueError(f"flow sigma weighting must be 'uniform' or 'logit_normal', got {weighting!r}")


def flow_loss(model_fn, params, x0, cond, null_cond, rng, schedule: FlowSchedule,
              cond_dropout=0.1, weighting: str = "logit_normal", mu: Optional[float] = None):
  """Conditional flow matching: mean ||v_theta(x_sigma, sigma N) - (eps - x0)||^2.

  The noise levels are drawn by `weighting` (sample_sigmas) and then shifted by the
  schedule like its sampling sigmas (FlowSchedule.shift_sigmas: shift s maps sigma to
  s sigma / (1 + (s - 1) sigma); dynamic shifting needs `mu`), as diffusers' SD3
  training scripts draw them from the shifted scheduler: a shift > 1 moves training
  toward pure noise, where a small image's layout is decided. cond / null_cond as for
  rft.diffusion.training.eps_loss (dropout replaces an example's cond by the null cond:
  classifier-free guidance). Returns (loss, {"loss", "mse"}).
  """
  batch = x0.shape[0]
  s_key, n_key, d_key = jax.random.split(rng, 3)
  sigma = sample_sigmas(s_key, batch, weighting)
  if schedule.use_dynamic_shifting or schedule.shift != 1.0:
    sigma = schedule.shift_sigmas(sigma, mu)
  noise = jax.random.normal(n_key, x0.shape, jnp.float32).astype(x0.dtype)
  sb = sigma.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  x_t = (1 - sb) * x0 + sb * noise
  if not (isinstance(cond_dropout, (int, float)) and cond_dropout == 0):
    drop = jax.random.bernoulli(d_key, cond_dropout, (batch,))
    cond = drop_cond(cond, broadcast_batch(null_cond, batch), drop)
  v = model_fn(params, x_t, sigma * schedule.num_train_timesteps, cond)
  err = jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0).astype(jnp.float32)),
                 axis=tuple(range(1, x0.ndim)))
  loss = jnp.mean(err)
  return loss, {"loss": loss, "mse": loss}
