"""Reward backpropagation through the sampler: DRaFT-K, DRaFT-LV and AlignProp.

All three maximise a differentiable reward of the final sample, L = − mean_i r(x_0^i, c_i),
differentiating through the sampling chain (reparameterised: x_{t-1} = mean_θ(x_t) + σ_t z):

* DRaFT-K (Clark et al., ICLR 2024): gradients flow through the last K steps only; the
  first T − K steps run without gradients (K = 1 is the paper's cheapest, best variant).
* DRaFT-LV: the chain runs without gradients; its final sample x_0 is re-noised n times to
  the last step's noise level, x_t^j = sqrt(ab_t) x_0 + sqrt(1 − ab_t) ε_j, each is denoised
  by one differentiable step, and the rewards are averaged (lower-variance DRaFT-1).
* AlignProp (Prabhudesai et al. 2023): randomised truncation, K ~ U{k_min..T} per update,
  so gradients reach every step in expectation without always paying for T of them.

Each differentiable step is wrapped in `jax.checkpoint`, so memory holds one step's
activations plus the T latents, whatever K is.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from rft.diffusion import ddim
from rft.diffusion.schedules import Schedule, add_noise


def _step_fn(eps_fn, schedule, eta, guidance_scale, clip_x0):
  def step(params, x, t, prev_t, cond, null, key):
    x_prev, _, _ = ddim._denoise_step(eps_fn, params, x, t, prev_t, cond, null, schedule,
                                      eta, guidance_scale, clip_x0, key=key, log_prob=False)
    return x_prev
  return jax.checkpoint(step)


def truncated_rollout(eps_fn: Callable, params: Any, x_T: jax.Array, cond: Any, null: Any, key,
                      *, schedule: Schedule, num_steps: int, eta: float, guidance_scale: float,
                      clip_x0: float | None, grad_steps, random_truncation: bool = False,
                      unroll=1):
  """Sample x_0 from x_T with gradients (w.r.t. params and x_T) through the last K steps.

  grad_steps: K (a Python int, 0 <= K <= T), or with random_truncation=True a traced int
  (AlignProp). With a static K the first T − K steps are a separate scan without
  gradients (no backward work at all); a traced K gates each step's output with
  stop_gradient instead (the backward then runs through all steps, multiplying by 0).
  unroll: of the differentiated scans (see rft.objectives.trajectory.auto_unroll: XLA:CPU
  runs backward convolutions inside rolled loops very slowly).
  """
  ts, prev_ts = ddim.ddim_timesteps(schedule.num_train_timesteps, num_steps)
  keys = jax.random.split(key, num_steps)
  step = _step_fn(eps_fn, schedule, eta, guidance_scale, clip_x0)
  xs = (jnp.asarray(ts), jnp.asarray(prev_ts), keys, jnp.arange(num_steps))

  if random_truncation:
    def body(x, s):
      t, prev_t, k, i = s
      x_prev = step(params, x, t, prev_t, cond, null, k)
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
    return jax.lax.stop_gradient(step(frozen, x, t, prev_t, cond, null, kk)), None

  def grad_body(x, s):
    t, prev_t, kk, _ = s
    return step(params, x, t, prev_t, cond, null, kk), None

  x = x_T
  if num_steps - k:
    x, _ = jax.lax.scan(frozen_body, jax.lax.stop_gradient(x_T), head)
  if k:
    x, _ = jax.lax.scan(grad_body, x, tail, unroll=unroll)
  return x


def lv_rollout(eps_fn: Callable, params: Any, x_T: jax.Array, cond: Any, null: Any, key, *,
               schedule: Schedule, num_steps: int, eta: float, guidance_scale: float,
               clip_x0: float | None, num_renoise: int):
  """DRaFT-LV: (x_0 without gradients, [n, B, ...] one-step re-denoised samples with gradients)."""
  k_chain, k_lv = jax.random.split(key)
  x0 = truncated_rollout(eps_fn, params, x_T, cond, null, k_chain, schedule=schedule,
                         num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                         clip_x0=clip_x0, grad_steps=0)
  ts, prev_ts = ddim.ddim_timesteps(schedule.num_train_timesteps, num_steps)
  t, prev_t = int(ts[-1]), int(prev_ts[-1])
  step = _step_fn(eps_fn, schedule, eta, guidance_scale, clip_x0)

  def one(k):
    k_noise, k_step = jax.random.split(k)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = add_noise(schedule, x0, noise, jnp.full((x0.shape[0],), t, jnp.int32))
    return step(params, x_t, t, prev_t, cond, null, k_step)

  return x0, jax.vmap(one)(jax.random.split(k_lv, num_renoise))


def reward_loss(reward_fn: Callable, images: jax.Array, prompts: dict):
  """L = − mean reward (images [..., B, H, W, C]: extra leading dims are averaged)."""
  lead = images.shape[:-4]
  flat = images.reshape((-1,) + images.shape[-3:])
  reps = int(flat.shape[0] // images.shape[-4])
  tiled = jax.tree.map(lambda a: jnp.tile(a, (reps,) + (1,) * (a.ndim - 1)), dict(prompts))
  r = reward_fn(flat, tiled).astype(jnp.float32)
  del lead
  return -jnp.mean(r), {"reward": jnp.mean(r)}
