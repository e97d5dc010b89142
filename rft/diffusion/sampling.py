"""Samplers as plug-ins, and every rollout written once over them.

A sampler is an object with

    timesteps(num_steps) -> (t [S], t_prev [S])        numpy, high noise first (the model's
                                                       timesteps: int32 for DDPM, float32
                                                       sigma * 1000 for flows)
    step(model_out, t, t_prev, x, *, key=None, prev_sample=None, log_prob=True)
        -> (x_prev, (log_prob_mean [B], log_prob_sum [B]) or None)
    predicted_x0(model_out, t, x) -> x0 estimate       (per-step value baselines)
    add_noise(x0, noise, t) -> x_t                     (the forward process at level t)

`step` both samples (prev_sample None: a draw with `key`) and scores a stored transition
(prev_sample given: its log-density under this step's Gaussian), through the same code,
so a recomputed log-prob equals the sampled one bit for bit. `model_out` is the
(guided) model output at (x, t). Registered samplers are built by name from
`config.sampler` (`build`); "ddim" is rft.diffusion.ddim.DDIMSampler, "flow" and
"flow_cps" are rft.diffusion.flow.FlowSampler (rectified flow: Flow-GRPO SDE / CPS).

Written once over that interface (a `model_fn(params, x, t, cond)` and a sampler):
`rollout` (a trajectory with per-step log-probs, optional x0 predictions),
`transition_log_prob` / `trajectory_log_probs` (the trainer's recompute),
`truncated_rollout` (differentiable: gradients through the last K steps, a static or a
traced K, K = T the full chain; each step rematerialised with `jax.checkpoint`) and
`renoised_last_step` (DRaFT-LV). Pass stored latents and timesteps to jitted code as
arguments, not closure constants: XLA folds constants with different rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from rft.diffusion import ddim, flow
from rft.diffusion.guidance import guided_eps

# name -> factory(schedule, *, eta, clip_x0, prediction) -> sampler
SAMPLERS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  """Decorator: register a sampler factory under `name` (config.sampler.name)."""
  def deco(factory):
    if name in SAMPLERS:
      raise ValueError(f"sampler {name!r} is already registered")
    SAMPLERS[name] = factory
    return factory
  return deco


def build(name: str, schedule, *, eta=1.0, clip_x0: Optional[float] = None,
          prediction: str = "eps"):
  """The sampler registered as `name` on `schedule`, for a model whose output is
  `prediction` (the pipeline's: "eps", "v", ...)."""
  if name not in SAMPLERS:
    raise ValueError(f"config.sampler.name={name!r} is not a registered sampler; known: "
                     f"{sorted(SAMPLERS)}")
  return SAMPLERS[name](schedule, eta=eta, clip_x0=clip_x0, prediction=prediction)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """config.sampler: which sampler, its steps, noise (eta > 0: stochastic, log-probs
  defined), classifier-free guidance scale and x0 clipping."""
  num_steps: int = 20
  eta: float = 1.0
  guidance_scale: float = 3.0
  clip_x0: float | None = 1.0
  name: str = "ddim"

  def build(self, schedule, prediction: str = "eps"):
    return build(self.name, schedule, eta=self.eta, clip_x0=self.clip_x0,
                 prediction=prediction)


# --------------------------------------------------------------------------- one step


def model_step(model_fn: Callable, params: Any, sampler, x_t: jax.Array, t, prev_t, cond: Any,
               null_cond: Any, guidance_scale, *, key=None, prev_sample=None,
               log_prob: bool = True, return_out: bool = False):
  """The one per-step function shared by the sampler and every log-prob recompute:
  (prev_sample, log_probs or None), plus the guided model output with return_out."""
  out = guided_eps(model_fn, params, x_t, t, cond, null_cond, guidance_scale)
  x_prev, lp = sampler.step(out, t, prev_t, x_t, key=key, prev_sample=prev_sample,
                            log_prob=log_prob)
  return (x_prev, lp, out) if return_out else (x_prev, lp)


# --------------------------------------------------------------------------- rollout


@struct.dataclass
class Trajectory:
  """A sampled chain.

  latents: [B, S+1, ...] (x_T first, final sample last); timesteps / prev_timesteps:
  [S] (the t and prev_t of each transition; int32 DDPM / float32 flow timesteps); log_probs / log_probs_sum: [B, S]
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
  # [B, S] float32: log p_ref(latents[:, i+1] | latents[:, i]) (mean over latent dims)
  # under a reference model's params, computed inside the rollout with ``ref_params``.
  ref_log_probs: Optional[jax.Array] = None

  @property
  def sample(self) -> jax.Array:
    return self.latents[:, -1]

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[-1]


def rollout(model_fn: Callable, params: Any, sampler, x_T: jax.Array, cond: Any,
            null_cond: Any, *, num_steps: int, guidance_scale=1.0,
            key: Optional[jax.Array] = None, record_x0: bool = False,
            sde_steps: Optional[jax.Array] = None, ref_params: Any = None) -> Trajectory:
  """num_steps transitions from x_T with CFG, recording latents and log-probs.

  One ``jax.lax.scan`` over steps; step i uses ``jax.random.split(key, num_steps)[i]``.
  key None: only for a deterministic sampler (DDIM with eta the Python number 0; the
  log-probs are then NaN). record_x0 also keeps each step's x0 prediction (no extra
  model call; latents and log-probs unchanged).

  sde_steps: None, or bool [num_steps] (may be traced): only the marked steps are the
  sampler's stochastic ones; the others take the same sampler's deterministic step (eta
  0: the ODE) from the same model output, and their log-probs are recorded as 0
  (MixGRPO's mixed ODE-SDE rollout, `sde_window`).

  ref_params: None, or a reference model's params (e.g. the frozen base for PRDP's
  pi_ref or a KL): each step also scores the sampled transition under them (the same
  per-step function as ``trajectory_log_probs``; equal to it within float rounding),
  recorded as ``ref_log_probs``; the policy's own chain and log-probs are bitwise
  unchanged. Both model calls sit in one loop body on the same x_t, so where the policy
  shares leaves with the reference (a finetuned subset of layers) XLA's
  common-subexpression elimination can compute the shared frozen input layers once.
  Measured on the ShapesWorld UNet inside the training loop's rollout it merged only
  the layers before the first use of the conditioning vector (two of seven frozen
  convolutions; it depends on XLA's pass order), so the saving there is small.
  """
  timesteps, prev_timesteps = sampler.timesteps(num_steps)
  keys = None if key is None else jax.random.split(key, num_steps)
  ode = None if sde_steps is None else dataclasses.replace(sampler, eta=0)

  def body(x, step):
    t, prev_t, k, sde = step
    x_prev, (lp_mean, lp_sum), out = model_step(model_fn, params, sampler, x, t, prev_t, cond,
                                                null_cond, guidance_scale, key=k,
                                                return_out=True)
    if ode is not None:
      x_ode, _ = ode.step(out, t, prev_t, x, log_prob=False)
      x_prev = jnp.where(sde, x_prev, x_ode)
      lp_mean, lp_sum = jnp.where(sde, lp_mean, 0.0), jnp.where(sde, lp_sum, 0.0)
    x0 = sampler.predicted_x0(out, t, x) if record_x0 else None
    ref = None
    if ref_params is not None:
      _, (ref, _) = model_step(model_fn, ref_params, sampler, x, t, prev_t, cond, null_cond,
                               guidance_scale, prev_sample=x_prev)
      if ode is not None:
        ref = jnp.where(sde, ref, 0.0)
    return x_prev, (x_prev, lp_mean, lp_sum, x0, ref)

  flags = (jnp.ones((num_steps,), bool) if sde_steps is None
           else jnp.asarray(sde_steps, bool).reshape(num_steps))
  xs = (jnp.asarray(timesteps), jnp.asarray(prev_timesteps), keys, flags)
  _, (chain, lp_mean, lp_sum, x0, ref) = jax.lax.scan(body, x_T, xs)
  latents = jnp.concatenate([x_T[None], chain], axis=0)
  return Trajectory(latents=jnp.moveaxis(latents, 0, 1),
                    timesteps=jnp.asarray(timesteps),
                    prev_timesteps=jnp.asarray(prev_timesteps),
                    log_probs=lp_mean.T, log_probs_sum=lp_sum.T,
                    x0_preds=None if x0 is None else jnp.moveaxis(x0, 0, 1),
                    ref_log_probs=None if ref is None else ref.T)


# --------------------------------------------------------------------------- recompute


def transition_log_prob(model_fn: Callable, params: Any, sampler, x_t: jax.Array,
                        x_prev: jax.Array, t, prev_t, cond: Any, null_cond: Any, *,
                        guidance_scale=1.0):
  """Log-prob of stored transitions x_t -> x_prev under ``params``: (mean [B], sum [B]).

  The trainer's side of DDPO / PRDP: t, prev_t are ints or int arrays (scalar or [B], so
  a minibatch may mix steps). The sampler and guidance scale must be those used for
  sampling for the ratio exp(new - old) to be 1 at unchanged params. Differentiable
  w.r.t. params.
  """
  _, (lp_mean, lp_sum) = model_step(model_fn, params, sampler, x_t, t, prev_t, cond, null_cond,
                                    guidance_scale, prev_sample=x_prev)
  return lp_mean, lp_sum


def trajectory_log_probs(model_fn: Callable, params: Any, sampler, traj: Trajectory, cond: Any,
                         null_cond: Any, *, guidance_scale=1.0, reduce: str = "mean"
                         ) -> jax.Array:
  """Every step's log-prob of ``traj`` under ``params``: [B, S] float32.

  A ``jax.lax.scan`` over the step axis running the sampler's own per-step function, so
  with the sampling params the result equals ``traj.log_probs`` (reduce="mean") or
  ``traj.log_probs_sum`` (reduce="sum") exactly.
  """
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
  lat = jnp.moveaxis(traj.latents, 1, 0)  # [S+1, B, ...]

  def body(carry, step):
    x_t, x_prev, t, prev_t = step
    _, (lp_mean, lp_sum) = model_step(model_fn, params, sampler, x_t, t, prev_t, cond,
                                      null_cond, guidance_scale, prev_sample=x_prev)
    return carry, (lp_mean if reduce == "mean" else lp_sum)

  _, lps = jax.lax.scan(body, None, (lat[:-1], lat[1:], traj.timesteps, traj.prev_timesteps))
  return lps.T


# --------------------------------------------------------------------------- differentiable


def _remat_step(model_fn, sampler, guidance_scale):
  def step(params, x, t, prev_t, cond, null, key):
    x_prev, _ = model_step(model_fn, params, sampler, x, t, prev_t, cond, null, guidance_scale,
                           key=key, log_prob=False)
    return x_prev
  return jax.checkpoint(step)


def truncated_rollout(model_fn: Callable, params: Any, sampler, x_T: jax.Array, cond: Any,
                      null_cond: Any, key, *, num_steps: int, guidance_scale=1.0, grad_steps,
                      random_truncation: bool = False, unroll=1) -> jax.Array:
  """x_0 from x_T with gradients (w.r.t. params and x_T) through the last K steps.

  grad_steps: K (a Python int, 0 <= K <= T; T is the full chain), or with
  random_truncation=True a traced int (AlignProp). With a static K the first T − K steps
  are a separate scan without gradients (no backward work at all); a traced K gates each
  step's output with stop_gradient instead (the backward then runs through all steps,
  multiplying by 0). Each step is rematerialised (memory: one step's activations plus
  the T latents). unroll: of the differentiated scans (rft.objectives.trajectory.
  auto_unroll: XLA:CPU runs backward convolutions inside rolled loops very slowly).
  """
  ts, prev_ts = sampler.timesteps(num_steps)
  keys = jax.random.split(key, num_steps)
  step = _remat_step(model_fn, sampler, guidance_scale)
  xs = (jnp.asarray(ts), jnp.asarray(prev_ts), keys, jnp.arange(num_steps))

  if random_truncation:
    def body(x, s):
      t, prev_t, k, i = s
      x_prev = step(params, x, t, prev_t, cond, null_cond, k)
      keep = i >= num_steps - grad_steps
      return jnp.where(keep, x_prev, jax.lax.stop_gradient(x_prev)), None
    x0, _ = jax.lax.scan(body, x_T, xs, unroll=unroll)
    return x0

  k = int(grad_steps)
  if not 0 <= k <= num_steps:
    raise ValueError(f"grad_steps={k} must be in [0, num_steps={num_steps}]")
  head = jax.tree.map(lambda a: a[:num_steps - k], xs)
  tail = jax.tree.map(lambda a: a[num_steps - k:], xs)
  frozen = jax.lax.stop_gradient(params)

  def frozen_body(x, s):
    t, prev_t, kk, _ = s
    return jax.lax.stop_gradient(step(frozen, x, t, prev_t, cond, null_cond, kk)), None

  def grad_body(x, s):
    t, prev_t, kk, _ = s
    return step(params, x, t, prev_t, cond, null_cond, kk), None

  x = x_T
  if num_steps - k:
    x, _ = jax.lax.scan(frozen_body, jax.lax.stop_gradient(x_T), head)
  if k:
    x, _ = jax.lax.scan(grad_body, x, tail, unroll=unroll)
  return x


def renoised_last_step(model_fn: Callable, params: Any, sampler, x0: jax.Array, cond: Any,
                       null_cond: Any, key, *, num_steps: int, guidance_scale=1.0,
                       copies: int) -> jax.Array:
  """[copies, B, ...]: x0 re-noised `copies` times to the last step's level (the
  sampler's forward process), each denoised by one differentiable step (DRaFT-LV)."""
  ts, prev_ts = sampler.timesteps(num_steps)
  t, prev_t = ts[-1].item(), prev_ts[-1].item()
  step = _remat_step(model_fn, sampler, guidance_scale)

  def one(k):
    k_noise, k_step = jax.random.split(k)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = sampler.add_noise(x0, noise, jnp.full((x0.shape[0],), t, ts.dtype))
    return step(params, x_t, t, prev_t, cond, null_cond, k_step)

  return jax.vmap(one)(jax.random.split(key, copies))


register("ddim")(ddim.DDIMSampler.build)
register("flow")(flow.factory("sde"))
register("flow_cps")(flow.factory("cps"))
