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

The differentiable rollouts are rft.diffusion.sampling's (any registered sampler); each
differentiable step is wrapped in `jax.checkpoint`, so memory holds one step's
activations plus the T latents, whatever K is.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from rft.diffusion import sampling
from rft.objectives import registry, trajectory


def lv_rollout(model_fn: Callable, params: Any, sampler, x_T: jax.Array, cond: Any, null: Any,
               key, *, num_steps: int, guidance_scale=1.0, num_renoise: int):
  """DRaFT-LV: (x_0 without gradients, [n, B, ...] one-step re-denoised samples with
  gradients): the chain runs without gradients, then its x_0 is re-noised n times to the
  last step's level and denoised by one differentiable step each."""
  k_chain, k_lv = jax.random.split(key)
  x0 = sampling.truncated_rollout(model_fn, params, sampler, x_T, cond, null, k_chain,
                                  num_steps=num_steps, guidance_scale=guidance_scale,
                                  grad_steps=0)
  return x0, sampling.renoised_last_step(model_fn, params, sampler, x0, cond, null, k_lv,
                                         num_steps=num_steps, guidance_scale=guidance_scale,
                                         copies=num_renoise)


def reward_loss(reward_fn: Callable, images: jax.Array, prompts: dict):
  """L = − mean reward (images [..., B, H, W, C]: extra leading dims are averaged)."""
  lead = images.shape[:-4]
  flat = images.reshape((-1,) + images.shape[-3:])
  reps = int(flat.shape[0] // images.shape[-4])
  tiled = jax.tree.map(lambda a: jnp.tile(a, (reps,) + (1,) * (a.ndim - 1)), dict(prompts))
  r = reward_fn(flat, tiled).astype(jnp.float32)
  del lead
  return -jnp.mean(r), {"reward": jnp.mean(r)}


# ------------------------------------------------------------------------ registration


def _make_draft(config, sampler_kw):
  o = config.objective
  unroll = trajectory.auto_unroll(config.unroll)

  def rollout(model_fn, params, x_T, cond, null, key, key_extra):
    del key_extra
    x0 = sampling.truncated_rollout(model_fn, params, x_T=x_T, cond=cond, null_cond=null,
                                    key=key, grad_steps=o.grad_steps, unroll=unroll,
                                    **sampler_kw)
    return x0, {"grad_steps": jnp.float32(o.grad_steps)}

  return rollout


def _make_draft_lv(config, sampler_kw):
  o = config.objective

  def rollout(model_fn, params, x_T, cond, null, key, key_extra):
    del key_extra
    _, renoised = lv_rollout(model_fn, params, x_T=x_T, cond=cond, null=null, key=key,
                             num_renoise=o.num_renoise, **sampler_kw)
    return renoised, {}

  return rollout


def _make_alignprop(config, sampler_kw):
  o = config.objective
  unroll = trajectory.auto_unroll(config.unroll)

  def rollout(model_fn, params, x_T, cond, null, key, key_extra):
    k = jax.random.randint(key_extra, (), o.min_grad_steps, sampler_kw["num_steps"] + 1)
    x0 = sampling.truncated_rollout(model_fn, params, x_T=x_T, cond=cond, null_cond=null,
                                    key=key, grad_steps=k, random_truncation=True,
                                    unroll=unroll, **sampler_kw)
    return x0, {"grad_steps": k.astype(jnp.float32)}

  return rollout


def _check_grad_steps(config):
  o, T = config.objective, config.sampler.num_steps
  if not 0 <= o.grad_steps <= T:
    raise ValueError(f"config.objective.grad_steps={o.grad_steps} must be in [0, "
                     f"config.sampler.num_steps={T}]")


def _check_min_grad_steps(config):
  o, T = config.objective, config.sampler.num_steps
  if not 1 <= o.min_grad_steps <= T:
    raise ValueError(f"config.objective.min_grad_steps={o.min_grad_steps} must be in [1, "
                     f"config.sampler.num_steps={T}]")


for _record in (
    registry.DiffusionObjective(
        name="draft", kind="reward_backprop", make_loss=_make_draft, check=_check_grad_steps,
        summary="reward gradient through the last K sampler steps (DRaFT-K, Clark et al. 2024)",
        differentiable_reward=True),
    registry.DiffusionObjective(
        name="draft_lv", kind="reward_backprop", make_loss=_make_draft_lv,
        summary="DRaFT-LV: n re-noised copies of the last step (Clark et al. 2024)",
        differentiable_reward=True),
    registry.DiffusionObjective(
        name="alignprop", kind="reward_backprop", make_loss=_make_alignprop,
        check=_check_min_grad_steps,
        summary="randomised truncation K ~ U{k_min..T} per update (Prabhudesai et al. 2023)",
        differentiable_reward=True)):
  registry.register_diffusion(_record)
