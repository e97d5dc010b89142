"""PRDP: proximal reward difference prediction (Deng et al., CVPR 2024).

Implicit reward of a denoising trajectory x̄ = (x_T, ..., x_0) for prompt c:

    r̂θ(x̄, c) = agg_t [ log πθ(x_{t-1} | x_t, c) − log πref(x_{t-1} | x_t, c) ]

with agg the sum over steps (the paper's Eq.) or the mean (its reference code); the
per-step log-probs are the sampler's Gaussian transition log-densities. For two samples
a, b of the same prompt the reward difference prediction (RDP) loss is

    L = ( r̂θ(a) − r̂θ(b) − (r(a) − r(b)) / β )²

averaged over all C(B, 2) pairs of the B samples of every prompt (optionally dropping
pairs with equal rewards). Its minimiser over all policies is πθ ∝ πref · exp(r / β),
the KL-regularised RL optimum (paper Thm. 4.1).

Proximal update (paper Eq. 18–21): each per-step log ratio ℓ_t = log πθ − log πref is
clipped to ℓ_t(θold) ± ε, giving r̂θ^clip, and the loss per pair is
max(L(r̂θ), L(r̂θ^clip)), the pessimistic choice, as in PPO.

Algorithm 1: each epoch snapshot θold, sample N prompts × B images from π_θold (their
per-step log-probs are stored: these are the ℓ_t(θold) + log πref), then K gradient steps.
Table 4 settings live in configs/prdp.py.

Per-step baselines (optional, `step_baselines` b [n, T]; rft.objectives.step_baselines).
At θ = θold the gradient of L w.r.t. the step-t log ratios is a score-function estimator
whose "reward" is r(a) − r(b) at every step. Adding, per pair,

    (2 / β) · agg_t[ (b_t(a) − b_t(b)) · (ℓ_t(a) − ℓ_t(b)) ]

(agg as in r̂) turns that reward into (r(a) − b_t(a)) − (r(b) − b_t(b)) at step t and
leaves the expected on-policy gradient unchanged whenever b_t is a function of the
step's input x_t alone, because E[∇ log πθ(x_{t−1} | x_t) | x_t] = 0. With b_t ≈
E[r | x_t], steps that no longer change the outcome get ≈ 0 reward differences, and so
≈ 0 gradient noise. With b = 0 (or None) the loss is exactly the paper's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rft.objectives import registry


def pair_mask(rewards: jax.Array, drop_ties: bool = False) -> jax.Array:
  """[G, B, B] bool: the pairs i < j within each group (and r_i != r_j if drop_ties)."""
  b = rewards.shape[-1]
  mask = jnp.triu(jnp.ones((b, b), bool), k=1)[None]
  mask = jnp.broadcast_to(mask, rewards.shape[:-1] + (b, b))
  if drop_ties:
    mask = mask & (rewards[..., :, None] != rewards[..., None, :])
  return mask


def implicit_reward(log_ratios: jax.Array, reduce: str) -> jax.Array:
  """r̂ [n] from per-step log ratios [n, T]: sum or mean over steps."""
  if reduce == "sum":
    return jnp.sum(log_ratios, axis=-1)
  if reduce == "mean":
    return jnp.mean(log_ratios, axis=-1)
  raise ValueError(f"PRDP reduce must be 'sum' or 'mean', got {reduce!r}")


def rdp_loss(log_probs: jax.Array, old_log_probs: jax.Array, ref_log_probs: jax.Array,
             rewards: jax.Array, *, group_size: int, beta: float, clip_eps: float | None,
             reduce: str = "mean", drop_ties: bool = False,
             step_baselines: jax.Array | None = None):
  """PRDP loss (scalar) and metrics.

  log_probs / old_log_probs / ref_log_probs: [n, T] per-step log-probs of the n sampled
  trajectories under θ, θold (the sampler) and πref; rewards [n]; samples are ordered by
  prompt, `group_size` = B consecutive samples per prompt. clip_eps None: plain RDP.
  step_baselines: None or [n, T] per-step baselines b_t (module docstring); they change
  the gradient's variance, not its on-policy expectation.
  """
  n, T = log_probs.shape
  if n % group_size:
    raise ValueError(f"{n} samples are not whole groups of group_size={group_size}")
  f32 = jnp.float32
  lp, old, ref = (x.astype(f32) for x in (log_probs, old_log_probs, ref_log_probs))
  ratio = lp - ref
  r_hat = implicit_reward(ratio, reduce).reshape(-1, group_size)
  r = rewards.astype(f32).reshape(-1, group_size)
  target = (r[:, :, None] - r[:, None, :]) / beta
  mask = pair_mask(r, drop_ties)
  num_pairs = jnp.sum(mask)
  count = jnp.maximum(num_pairs, 1)

  if step_baselines is not None:
    if step_baselines.shape != log_probs.shape:
      raise ValueError(f"step_baselines shape {step_baselines.shape} != log_probs shape "
                       f"{log_probs.shape} ([n, T])")
    b = jax.lax.stop_gradient(step_baselines.astype(f32)).reshape(-1, group_size, T)

  def pair_losses(ratios):
    rh = implicit_reward(ratios, reduce).reshape(-1, group_size)
    sq = jnp.square(rh[:, :, None] - rh[:, None, :] - target)
    if step_baselines is None:
      return sq
    rg = ratios.reshape(-1, group_size, T)
    d_ratio = rg[:, :, None, :] - rg[:, None, :, :]  # [G, B, B, T]
    d_base = b[:, :, None, :] - b[:, None, :, :]
    return sq + (2.0 / beta) * implicit_reward(d_base * d_ratio, reduce)

  unclipped = pair_losses(ratio)
  if clip_eps is None:
    per_pair = unclipped
    clip_frac = jnp.zeros((), f32)
  else:
    old_ratio = old - ref
    clipped_ratio = old_ratio + jnp.clip(ratio - old_ratio, -clip_eps, clip_eps)
    per_pair = jnp.maximum(unclipped, pair_losses(clipped_ratio))
    clip_frac = jnp.mean((jnp.abs(lp - old) > clip_eps).astype(f32))
  loss = jnp.sum(jnp.where(mask, per_pair, 0.0)) / count
  metrics = {
      "loss": loss,
      "clip_frac": clip_frac,
      "pairs": num_pairs.astype(f32),
      "implicit_reward_gap": jnp.sum(jnp.where(mask, jnp.abs(
          r_hat[:, :, None] - r_hat[:, None, :]), 0.0)) / count,
      "target_gap": jnp.sum(jnp.where(mask, jnp.abs(target), 0.0)) / count,
      "log_ratio_to_old": jnp.mean(lp - old),
  }
  return loss, metrics


# ------------------------------------------------------------------------ registration


def _make_loss(config) -> registry.TrajectoryLoss:
  o, B = config.objective, config.samples_per_prompt

  def loss(lp, b):
    return rdp_loss(lp, b["log_probs"], b["ref_log_probs"], b["rewards"], group_size=B,
                    beta=o.beta, clip_eps=o.clip_eps if o.clip_eps > 0 else None,
                    reduce=o.reduce, drop_ties=o.drop_ties,
                    step_baselines=b.get("step_baselines"))

  return registry.TrajectoryLoss(per_step=False, fn=loss)


def _prepare(config, ids, scores, step_values, stats):
  del config, ids, scores, stats
  return ({} if step_values is None else {"step_baselines": step_values}), {}


def _check(config):
  o = config.objective
  if o.reduce not in ("sum", "mean"):
    raise ValueError(f"config.objective.reduce={o.reduce!r}; use 'sum' or 'mean'")
  if o.beta <= 0:
    raise ValueError(f"config.objective.beta={o.beta}: PRDP's targets are (r(a) - r(b)) / "
                     f"beta, so beta must be > 0")


registry.register_diffusion(registry.DiffusionObjective(
    name="prdp", kind="trajectory",
    summary="pair regression of implicit reward differences, proximal clip (Deng et al. 2024)",
    make_loss=_make_loss, prepare=_prepare, check=_check,
    needs_ref_log_probs=True, needs_groups=True))
