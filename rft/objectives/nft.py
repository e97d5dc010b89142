"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with
Forward Process"): reinforcement on the forward (noising) process of a flow model.

Samples come from a *sampling policy* v_old that trails the trained one (any solver, no
log-probs: the deterministic Euler ODE by default, no CFG). Each image x0 gets an
optimality probability from its group-normalised advantage A (rft.objectives.flow_grpo):

    r = clip( clip(A, ±c) / 2c + 1/2, 0, 1 )                       (c = adv_clip_max)

and the update is flow matching on fresh noisings of x0 at the sampler's noise levels,
x_t = (1 − σ) x0 + σ ε, with two implicit policies around the trained v_θ:

    v⁺ = β v_θ + (1 − β) v_old,        v⁻ = (1 + β) v_old − β v_θ
    x̂⁺ = x_t − σ v⁺,  x̂⁻ = x_t − σ v⁻                 (their x0 predictions)
    L = c · mean_i [ r_i ‖x̂⁺ − x0‖² / w⁺ + (1 − r_i) ‖x̂⁻ − x0‖² / w⁻ ] / β
        + kl_coef · mean ‖v_θ − v_ref‖²

with ‖·‖² the mean over dims and the adaptive weights w = stop_grad(mean |x̂ − x0|),
floored at 1e-5 (the reference code's weighting); v_ref is the frozen base. Good samples
(r → 1) pull v⁺ to them, bad ones (r → 0) push v⁻ to them, i.e. v_θ away. Each image
is noised at a random `timestep_fraction` of the sampler's T levels (per image).

After every epoch the sampling policy moves toward the trained one,
θ_old ← d θ_old + (1 − d) θ, with d = min(max(0, s − flat) · rate, cap) at optimizer
step s (`old_decay = (flat, rate, cap)`; the reference's decay types 0, 1, 2 are
(0, 0, 0), (0, 0.001, 0.5) and (75, 0.0075, 0.999)). The loop keeps θ_old in the
checkpoint (the record's `sampling_decay`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rft.diffusion.sampling import SamplerConfig
from rft.objectives import flow_grpo, registry


def optimality(advantages, adv_clip_max: float) -> np.ndarray:
  """r in [0, 1] from advantages: clip to ±c, map [−c, c] linearly onto [0, 1]."""
  a = np.clip(np.asarray(advantages, np.float32), -adv_clip_max, adv_clip_max)
  return np.clip(a / adv_clip_max / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def sampling_decay(step: int, flat: float, rate: float, cap: float) -> float:
  """d of the sampling policy's soft update at optimizer step `step`."""
  return 0.0 if step < flat else float(min((step - flat) * rate, cap))


def nft_loss(v_theta, v_old, x_t, x0, sigma, r, beta: float, adv_clip_max: float):
  """(per-sample loss [n], metrics) of the negative-aware objective (module docstring);
  sigma broadcastable to x0, r [n]."""
  axes = tuple(range(1, x0.ndim))
  v_old = jax.lax.stop_gradient(v_old)

  def term(v):
    x0_hat = x_t - sigma * v
    w = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x0_hat - x0), axes), 1e-5))
    return jnp.mean(jnp.square(x0_hat - x0), axes) / w

  pos = term(beta * v_theta + (1 - beta) * v_old)
  neg = term((1 + beta) * v_old - beta * v_theta)
  per = adv_clip_max * (r * pos + (1 - r) * neg) / beta
  return per, {"positive_loss": jnp.mean(pos), "negative_loss": jnp.mean(neg),
               "old_deviation": jnp.mean(jnp.square(v_theta - v_old))}


def _make_loss(config, pipe):
  o = config.objective
  sampler_cfg = SamplerConfig(**dict(config.sampler))
  t_grid, _ = pipe.sampler(sampler_cfg).timesteps(sampler_cfg.num_steps)
  t_grid = jnp.asarray(t_grid, jnp.float32)  # model time sigma * num_train_timesteps
  T = t_grid.shape[0]
  k = max(1, int(round(o.timestep_fraction * T)))
  num_train = pipe.schedule.num_train_timesteps

  def loss(params, b, key, *, sampling_params, ref_params):
    x0, cond, r = b["images"], b["cond"], b["optimality"]
    n = x0.shape[0]
    k_perm, k_noise = jax.random.split(key)
    # Per image, k of the T noise levels (a random permutation's first k).
    order = jax.vmap(lambda kk: jax.random.permutation(kk, T))(jax.random.split(k_perm, n))

    def level(carry, j):
      t = t_grid[order[:, j]]  # [n]
      sigma = (t / num_train).reshape((n,) + (1,) * (x0.ndim - 1))
      eps = jax.random.normal(jax.random.fold_in(k_noise, j), x0.shape, jnp.float32)
      x_t = (1 - sigma) * x0 + sigma * eps
      v_theta = pipe.model_fn(params, x_t, t, cond)
      v_old = pipe.model_fn(sampling_params, x_t, t, cond)
      per, m = nft_loss(v_theta, v_old, x_t, x0, sigma, r, o.beta, o.adv_clip_max)
      value = jnp.mean(per)
      if o.kl_coef:
        v_ref = jax.lax.stop_gradient(pipe.model_fn(ref_params, x_t, t, cond))
        kl = jnp.mean(jnp.square(v_theta - v_ref))
        value = value + o.kl_coef * kl
        m = dict(m, kl=kl)
      return carry, (value, m)

    # One noise level at a time, rematerialised: memory of one forward + backward.
    _, (values, ms) = jax.lax.scan(jax.checkpoint(level), None, jnp.arange(k))
    return jnp.mean(values), jax.tree.map(jnp.mean, ms)

  return loss


def _prepare(config, ids, scores, step_values, stats):
  del step_values, stats
  o = config.objective
  adv, _ = flow_grpo.group_advantages(ids, scores, o.global_std)
  r = optimality(adv, o.adv_clip_max)
  return ({"keep": np.arange(len(scores)), "optimality": r},
          {"optimality_mean": float(r.mean()), "advantage_abs_mean": float(np.abs(adv).mean())})


def _check(config):
  o = config.objective
  if not config.sampler.name.startswith("flow"):
    raise ValueError(f"config.sampler.name={config.sampler.name!r}: nft trains a flow model on "
                     "its forward process ('flow' sampler of a flow base, config.base_dir)")
  if not o.beta > 0:
    raise ValueError(f"config.objective.beta={o.beta}: must be > 0")
  if not o.adv_clip_max > 0:
    raise ValueError(f"config.objective.adv_clip_max={o.adv_clip_max}: must be > 0")
  if not 0 < o.timestep_fraction <= 1:
    raise ValueError(f"config.objective.timestep_fraction={o.timestep_fraction}: must be in "
                     "(0, 1]")
  if not o.kl_coef >= 0:
    raise ValueError(f"config.objective.kl_coef={o.kl_coef}: must be >= 0")
  flat, rate, cap = _decay_settings(o)
  if flat < 0 or rate < 0 or not 0 <= cap < 1:
    raise ValueError(f"config.objective.old_decay={tuple(o.old_decay)}: (flat >= 0, rate >= 0, "
                     "0 <= cap < 1)")


def _decay_settings(o):
  d = tuple(o.old_decay)
  if len(d) != 3:
    raise ValueError(f"config.objective.old_decay={d}: expected (flat, rate, cap)")
  return float(d[0]), float(d[1]), float(d[2])


def _sampling_decay(config, step: int) -> float:
  return sampling_decay(step, *_decay_settings(config.objective))


registry.register_diffusion(registry.DiffusionObjective(
    name="nft", kind="select_sft",
    summary="negative-aware flow matching on the forward process, lagged sampling policy "
            "(Zheng et al. 2025)",
    make_loss=_make_loss, prepare=_prepare, check=_check, needs_groups=True,
    sampling_decay=_sampling_decay,
    rows_per_prompt=lambda c: (c.samples_per_prompt, "config.samples_per_prompt")))
