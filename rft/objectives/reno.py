"""ReNO: reward-based optimisation of the initial noise (Eyring et al., NeurIPS 2024).

Inference-time, no weight update. A few-step deterministic sampler G maps the initial
noise z to an image; ReNO takes gradient steps on z to maximise a differentiable reward
R(G(z), prompt), regularised to keep z on the Gaussian shell:

  loss(z) = sum_b [ -R(G(z_b), p_b) + lambda * reg(z_b) ]
  reg(z)  = 0.5 ||z||^2 - (d - 1) log ||z||       (d = number of dims of one z)

reg is the negative log-density of ||z|| under z ~ N(0, I_d) (a chi distribution with d
degrees of freedom) up to a constant, minimal at ||z|| = sqrt(d - 1). The paper's
optimiser is SGD with Nesterov momentum, lr 5, the gradient clipped to norm 0.1 per
example; every iterate is scored and the best one by reward is returned (later iterates
can be worse: reward hacking or a too-large step).

Everything here is pure and traceable: ``optimize`` is one ``lax.scan`` over iterations
and ``ddim_generate`` one ``lax.scan`` over sampler steps with a rematerialised
(``jax.checkpoint``) step, so memory does not grow with the number of steps. Jit the
caller with the model params as arguments (not closure constants).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rft.diffusion.schedules import Schedule, _per_example

Generate = Callable[[jax.Array], jax.Array]
RewardFn = Callable[[jax.Array, Mapping[str, Any]], jax.Array]


def _sum_per_example(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def per_example_norm(x: jax.Array) -> jax.Array:
  """||x_b||_2 over all non-batch dims: [B]."""
  return jnp.sqrt(_sum_per_example(jnp.square(x.astype(jnp.float32))))


def norm_regularizer(z: jax.Array) -> jax.Array:
  """Per example 0.5 r^2 - (d - 1) log r with r = ||z_b||, d = prod(z.shape[1:]): [B].

  Gradient: z - (d - 1) z / r^2 (zero on the shell r^2 = d - 1).
  """
  d = int(np.prod(z.shape[1:]))
  r2 = _sum_per_example(jnp.square(z.astype(jnp.float32)))
  return 0.5 * r2 - 0.5 * (d - 1) * jnp.log(r2)


def clip_per_example(g: jax.Array, max_norm: Optional[float]) -> jax.Array:
  """Rescales each example's gradient g_b to norm <= max_norm (None or 0: unchanged)."""
  if max_norm is None or (isinstance(max_norm, (int, float)) and max_norm <= 0):
    return g
  norm = per_example_norm(g)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
  return g * _per_example(scale, g.ndim).astype(g.dtype)


def loss(z: jax.Array, generate: Generate, reward: RewardFn, prompts: Mapping[str, Any],
         reg_weight) -> tuple[jax.Array, dict]:
  """ReNO loss -sum_b R(G(z_b)) + reg_weight * sum_b reg(z_b) and its parts.

  Returns (loss, aux) with aux = {"reward": [B], "reg": [B], "images": G(z)}. Examples
  do not interact, so the gradient of the sum is the per-example gradient.
  """
  images = generate(z)
  r = jnp.asarray(reward(images, prompts), jnp.float32)
  if isinstance(reg_weight, (int, float)) and reg_weight == 0:
    # Static 0: keep the regulariser out of the gradient (its log r is -inf at z = 0).
    reg = jax.lax.stop_gradient(norm_regularizer(z))
    total = -jnp.sum(r)
  else:
    reg = norm_regularizer(z)
    total = -jnp.sum(r) + reg_weight * jnp.sum(reg)
  return total, {"reward": r, "reg": reg, "images": images}


def make_optimizer(name: str = "sgd", lr: float = 5.0, momentum: float = 0.9,
                   nesterov: bool = True) -> optax.GradientTransformation:
  """ReNO's SGD (Nesterov momentum) or Adam; both act elementwise, so per example."""
  if name == "sgd":
    return optax.sgd(lr, momentum=momentum or None, nesterov=bool(nesterov and momentum))
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"unknown ReNO optimizer {name!r}; known: 'sgd', 'adam'")


def optimize(z0: jax.Array, generate: Generate, reward: RewardFn, prompts: Mapping[str, Any], *,
             n_iters: int, tx: Optional[optax.GradientTransformation] = None,
             grad_clip: Optional[float] = 0.1, reg_weight=0.01) -> dict:
  """n_iters ReNO iterations from z0 [B, ...]; returns the best iterate per example.

  Iteration i scores z_i (one reward query per example) and then steps to z_{i+1};
  iteration 0 scores z0 (plain sampling), so z_{n_iters} is never scored and exactly
  n_iters * B reward queries are made. ``tx`` defaults to make_optimizer() (SGD, lr 5,
  Nesterov 0.9). Returns:

    z, images, reward, best_iter : the best scored iterate per example (ties: earliest)
    initial_images, initial_reward : iteration 0
    rewards, regs, grad_norms : [n_iters, B] per-iteration curves (grad norm before
                                clipping)
    last_z : z_{n_iters}
  """
  if n_iters < 1:
    raise ValueError(f"optimize needs n_iters >= 1, got {n_iters}")
  tx = make_optimizer() if tx is None else tx
  value_and_grad = jax.value_and_grad(loss, has_aux=True)
  batch = z0.shape[0]

  def body(carry, i):
    z, opt_state, best = carry
    (_, aux), g = value_and_grad(z, generate, reward, prompts, reg_weight)
    r, images = aux["reward"], aux["images"]
    better = r > best["reward"]
    pick = lambda new, old: jnp.where(_per_example(better, new.ndim), new, old)
    first = lambda new, old: jnp.where(i == 0, new, old)
    best = {"z": pick(z, best["z"]), "images": pick(images, best["images"]),
            "reward": jnp.where(better, r, best["reward"]),
            "best_iter": jnp.where(better, i, best["best_iter"]),
            "initial_images": first(images, best["initial_images"]),
            "initial_reward": first(r, best["initial_reward"])}
    grad_norm = per_example_norm(g)
    updates, opt_state = tx.update(clip_per_example(g, grad_clip), opt_state, z)
    z = optax.apply_updates(z, updates)
    return (z, opt_state, best), {"rewards": r, "regs": aux["reg"], "grad_norms": grad_norm}

  image_shape = jax.eval_shape(generate, z0)
  zeros_images = jnp.zeros(image_shape.shape, image_shape.dtype)
  best0 = {"z": z0, "images": zeros_images,
           "reward": jnp.full((batch,), -jnp.inf, jnp.float32),
           "best_iter": jnp.zeros((batch,), jnp.int32),
           "initial_images": zeros_images, "initial_reward": jnp.zeros((batch,), jnp.float32)}
  (last_z, _, best), curves = jax.lax.scan(
      body, (z0, tx.init(z0), best0), jnp.arange(n_iters, dtype=jnp.int32))
  return {**best, **curves, "last_z": last_z}


# --------------------------------------------------------------------------- generator


def ddim_generate(eps_fn, params: Any, x_T: jax.Array, cond: Any, null_cond: Any, *,
                  schedule: Schedule, num_steps: int, guidance_scale=1.0,
                  clip_x0: Optional[float] = None, unroll=1) -> jax.Array:
  """Deterministic DDIM (eta 0) from x_T, differentiable in x_T: the final sample.

  The same transitions as ``sampling.rollout`` with ``DDIMSampler(schedule, eta=0.0)``
  and no key, through the differentiable rollout (rft.diffusion.sampling.
  truncated_rollout with K = T): no log-probs (NaN at eta 0), each step rematerialised
  (``jax.checkpoint``).
  """
  from rft.diffusion import ddim, sampling
  sampler = ddim.DDIMSampler(schedule, eta=0.0, clip_x0=clip_x0)
  return sampling.truncated_rollout(eps_fn, params, sampler, x_T, cond, null_cond,
                                    jax.random.key(0), num_steps=num_steps,
                                    guidance_scale=guidance_scale, grad_steps=num_steps,
                                    unroll=unroll)
