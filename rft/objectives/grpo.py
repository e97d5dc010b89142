"""GRPO-family losses for language models: advantages, clipped policy loss, DAPO tools, RAFT.

Layout: rewards [N] with N = num_groups · G, the G completions of one prompt contiguous;
token arrays [N, L] (log-probs of the sampled completion tokens) with `mask` [N, L]
marking completion tokens (bool, or float weights).

Advantages (group-relative, no critic). With r̄_g the mean of group g:

* grpo    A_i = (r_i − r̄_g) / (σ + eps)             Shao et al. 2024 (DeepSeekMath)
* dr_grpo A_i =  r_i − r̄_g                          Liu et al. 2025, "Understanding
          R1-Zero-like training" (std scaling biases towards too easy / hard prompts)
* rloo    A_i =  r_i − mean_{j≠i} r_j = G/(G−1) (r_i − r̄_g)   Ahmadian et al. 2024

σ follows TRL's GRPOConfig.scale_rewards: "group" = std of the group, "batch" = std of
all N rewards (the mean stays per group: LitePPO, Liu et al. 2025 "Tricks or Traps?",
TRL PR #3935), "none" = no division. Stds are Bessel-corrected (ddof=1) like torch.std,
eps = 1e-4 as in TRL.

Policy loss per token, with ρ the importance ratio and KL_t an estimate of KL(π‖πref):

    l_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β KL_t

* token importance (PPO/GRPO): ρ_t = exp(lp_t − lp_t^old).
* sequence importance (GSPO, Zheng et al. 2025): s_i = exp(mean_t(lp_t − lp_t^old)) over
  the sequence's masked tokens, used in the paper's GSPO-token form
  ρ_t = sg[s_i] · π(y_t)/sg[π(y_t)]: its value is s_i at every token and its gradient
  s_i ∇lp_t, so with A constant per sequence the grpo aggregation gives GSPO's gradient.
* ε_high > ε is DAPO's clip-higher (Yu et al. 2025).
* KL (Schulman, "Approximating KL divergence", 2020), δ = lp_ref − lp:
  k1 = −δ = lp − lp_ref, k3 = exp(δ) − δ − 1 (unbiased, always ≥ 0).

Aggregation of l over tokens (m the mask):

* grpo    (1/N) Σ_i Σ_t m l / Σ_t m           per-sequence token mean, then mean
* bnpo    Σ_{i,t} m l / Σ_{i,t} m             token mean over this (micro-)batch
* dr_grpo Σ_{i,t} m l / (N · max_len)         constant divisor (no length bias)
* dapo    Σ_{i,t} m l / num_tokens_total      token mean over the whole generation batch

bnpo and dapo agree on one batch. When a step's generation batch is split into
minibatches, bnpo normalises each minibatch by its own token count, so the minibatch
losses do not add up to the batch token mean; dapo divides every minibatch by the token
count of the whole generation batch (`num_tokens_total`), so the *sum* of the minibatch
losses (and of their gradients) is exactly DAPO's token-level loss of the whole batch,
as in the DAPO paper and TRL (its "dapo" loss divides each micro-batch's sum by
num_items_in_batch, the active completion tokens of the whole generation batch over all
processes). The lm_rl loop passes that count as the batch column "step_loss_tokens": Σ
completion_mask · loss_weight over the rows of the step's pass (all minibatches, all
processes), the same value in every row. Without that column (one batch on its own) the
divisor is the batch's own count. With M minibatches the logged loss, a mean over the
updates, is then the step's token-mean loss divided by M.

DAPO's other tools: dynamic sampling (keep only groups whose rewards differ, refill by
generating more: `fill_batch`), overlong filtering (truncated completions drop out of
the loss) and soft overlong punishment (a length penalty on the last `cache_len` tokens).

RAFT for LMs (Dong et al. 2023): finetune (SFT loss) on the best completions per group.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rft.objectives import registry
from rft.objectives.raft import select_top
from rft.rewards import shaping

SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------- advantages


def _groups(rewards, group_size: int) -> jax.Array:
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f"rewards must be [N], got shape {r.shape}")
  if group_size < 2:
    raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards are not whole groups of group_size={group_size}")
  return r.reshape(-1, group_size)


def _mean_baseline(g: jax.Array) -> jax.Array:
  """r_i − r̄_g."""
  return g - g.mean(axis=1, keepdims=True)


def _loo_baseline(g: jax.Array) -> jax.Array:
  """r_i − (Σ_j r_j − r_i) / (G − 1)."""
  n = g.shape[1]
  return g - (g.sum(axis=1, keepdims=True) - g) / (n - 1)


class Estimator(NamedTuple):
  center: Callable[[jax.Array], jax.Array]  # [groups, G] -> centred rewards
  default_scale: str  # scale_rewards when the caller passes None
  scales: tuple[str, ...] = SCALE_REWARDS  # allowed scale_rewards


ADVANTAGES: dict[str, Estimator] = {
    "grpo": Estimator(_mean_baseline, "group"),
    "dr_grpo": Estimator(_mean_baseline, "none", ("none",)),
    "rloo": Estimator(_loo_baseline, "none"),
}


def advantages(rewards, group_size: int, estimator: str = "grpo",
               scale_rewards: str | None = None, eps: float = 1e-4):
  """(advantages [N], group_std [num_groups]) float32.

  scale_rewards: "group" | "batch" | "none", or None for the estimator's own choice
  (grpo: "group"; dr_grpo and rloo: "none"). dr_grpo is defined without std scaling, so
  it only accepts "none". group_std is the std (ddof=1) of each group's raw rewards
  whatever the scaling: `mean(group_std == 0)` is the fraction of groups that carry no
  learning signal.
  """
  if estimator not in ADVANTAGES:
    raise ValueError(f"unknown advantage estimator {estimator!r}; known: {sorted(ADVANTAGES)}")
  est = ADVANTAGES[estimator]
  scale = est.default_scale if scale_rewards is None else scale_rewards
  if scale not in est.scales:
    raise ValueError(f"scale_rewards={scale!r} is not valid for estimator {estimator!r}; "
                     f"expected one of {est.scales}")
  g = _groups(rewards, group_size)
  group_std = jnp.std(g, axis=1, ddof=1)
  adv = est.center(g)
  if scale == "group":
    adv = adv / (group_std[:, None] + eps)
  elif scale == "batch":
    adv = adv / (jnp.std(g, ddof=1) + eps)
  return adv.reshape(-1), group_std


def aggregate(reward_matrix, weights, group_size: int, order: str = "sum_then_normalize", *,
              scale_rewards: str | None = None, eps: float = 1e-4):
  """Advantages from several rewards [N, R] with weights [R]: (advantages [N], group_std).

  * "sum_then_normalize" (GRPO, TRL's default): r = Σ_k w_k r_k, then the grpo advantage
    with `scale_rewards` (default "group").
  * "normalize_then_sum" (GDPO, "Group reward-Decoupled Normalization Policy Optimization";
    TRL's multi_objective_aggregation): each reward is normalised within its group,
    ñ_k = (r_k − r̄_k,g) / (σ_k,g + eps), then s = Σ_k w_k ñ_k is z-scored over the
    batch: A = (s − mean(s)) / (std(s) + eps).
    A reward that is constant in a group contributes 0 there instead of being drowned
    out or dominating by scale. `scale_rewards` does not apply (must stay None).

  group_std: per-group std of the summed reward (Σ w r, or s).
  """
  x = jnp.asarray(reward_matrix, jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  if x.ndim != 2 or w.shape != (x.shape[1],):
    raise ValueError(f"reward_matrix must be [N, R] and weights [R]; got {x.shape} and {w.shape}")
  if order == "sum_then_normalize":
    return advantages(x @ w, group_size, "grpo", scale_rewards or "group", eps)
  if order != "normalize_then_sum":
    raise ValueError(f"unknown order {order!r}; expected 'sum_then_normalize' or "
                     "'normalize_then_sum'")
  if scale_rewards is not None:
    raise ValueError("scale_rewards applies to order='sum_then_normalize' only; "
                     "normalize_then_sum always ends with a batch z-score")
  _groups(x[:, 0], group_size)  # shape checks
  s = shaping.multi_reward_normalize(x, w, order="normalize_then_sum", group_size=group_size,
                                     batch_renorm=False, eps=eps)  # Σ_k w_k ñ_k, [N]
  adv = shaping.zscore(s, 0, True, eps)
  return adv, jnp.std(s.reshape(-1, group_size), axis=1, ddof=1)


def process_advantages(step_rewards, step_tokens, group_size: int, length: int,
                       eps: float = 1e-4) -> np.ndarray:
  """Per-token advantages [N, length] from per-step rewards (process supervision, as in
  DeepSeekMath's GRPO, Shao et al. 2024, section 4.1.3):

      r~_j = (r_j - mean(R_g)) / (std(R_g) + eps),   A_t = sum over steps j of the
      completion with token(j) >= t of r~_j

  R_g: every step reward of the group's completions (std with ddof=1, as `advantages`);
  token(j): the token that ends step j. A token after the last step gets 0.

  step_rewards, step_tokens: one array per completion (N = groups * group_size).
  """
  n = len(step_rewards)
  if n != len(step_tokens) or n % group_size:
    raise ValueError(f"process_advantages: {n} step-reward rows, {len(step_tokens)} step-token "
                     f"rows, group_size {group_size}")
  out = np.zeros((n, length), np.float32)
  for g in range(n // group_size):
    rows = range(g * group_size, (g + 1) * group_size)
    pooled = np.concatenate([np.asarray(step_rewards[i], np.float64) for i in rows])
    std = pooled.std(ddof=1) if len(pooled) > 1 else 0.0
    mean = pooled.mean() if len(pooled) else 0.0
    for i in rows:
      r = (np.asarray(step_rewards[i], np.float64) - mean) / (std + eps)
      tok = np.asarray(step_tokens[i], np.int64)
      if len(r) != len(tok):
        raise ValueError(f"completion {i}: {len(r)} step rewards but {len(tok)} step tokens")
      if len(tok) and (tok.min() < 0 or tok.max() >= length):
        raise ValueError(f"completion {i}: step tokens {tok.tolist()} outside [0, {length})")
      per_token = np.zeros(length, np.float64)
      np.add.at(per_token, tok, r)
      out[i] = np.cumsum(per_token[::-1])[::-1]  # sum over steps ending at or after t
  return out


# --------------------------------------------------------------------------- policy loss


def _masked_mean(x, m):
  return jnp.sum(jnp.where(m > 0, x * m, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


# KL(π‖πref) estimators from δ = lp_ref − lp per token (module docstring).
KL_ESTIMATORS: dict[str, Callable] = {
    "k1": lambda delta: -delta,
    "k3": lambda delta: jnp.exp(delta) - delta - 1.0,
}


def _check_kl_estimator(estimator: str) -> None:
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of "
                     f"{sorted(KL_ESTIMATORS)}")


def kl_estimate(log_probs, ref_log_probs, estimator: str = "k3") -> jax.Array:
  """Per-token KL(π‖πref) estimate from samples of π: k1 = lp − ref,
  k3 = exp(ref − lp) − (ref − lp) − 1."""
  _check_kl_estimator(estimator)
  return KL_ESTIMATORS[estimator](ref_log_probs - log_probs)


# Token aggregations: (weighted [N, L] = m · l, m [N, L], max_len, num_tokens_total) ->
# scalar (module docstring).
def _agg_grpo(weighted, m, max_len, num_tokens_total):
  return jnp.mean(jnp.sum(weighted, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))


def _agg_bnpo(weighted, m, max_len, num_tokens_total):
  return jnp.sum(weighted) / jnp.maximum(jnp.sum(m), 1.0)


def _agg_dr_grpo(weighted, m, max_len, num_tokens_total):
  n, length = m.shape
  return jnp.sum(weighted) / (n * (length if max_len is None else max_len))


def _agg_dapo(weighted, m, max_len, num_tokens_total):
  denom = jnp.sum(m) if num_tokens_total is None else jnp.asarray(num_tokens_total,
                                                                   jnp.float32)
  return jnp.sum(weighted) / jnp.maximum(denom, 1.0)


AGGREGATORS: dict[str, Callable] = {"grpo": _agg_grpo, "bnpo": _agg_bnpo,
                                    "dr_grpo": _agg_dr_grpo, "dapo": _agg_dapo}


# Importance weights: (log_ratio [N, L] = lp − lp_old, lp [N, L], m [N, L]) -> log ρ [N, L].
def _token_importance(log_ratio, lp, m):
  return log_ratio


def _sequence_importance(log_ratio, lp, m):
  """GSPO-token: value s_i (the sequence's mean log ratio) at every token, gradient ∇lp_t."""
  seq = jnp.sum(log_ratio * m, axis=1, keepdims=True) / jnp.maximum(
      jnp.sum(m, axis=1, keepdims=True), 1.0)
  return jax.lax.stop_gradient(seq) + lp - jax.lax.stop_gradient(lp)


IMPORTANCE: dict[str, Callable] = {"token": _token_importance, "sequence": _sequence_importance}


def aggregate_tokens(per_token, mask, aggregation: str, *, max_len: int | None = None,
                     num_tokens_total=None) -> jax.Array:
  """Scalar from per-token losses [N, L] and mask [N, L]; see the module docstring.

  max_len (default L) is only read by dr_grpo, so callers may always pass it;
  num_tokens_total is dapo's divisor and an error with any other aggregation.
  """
  if aggregation not in AGGREGATORS:
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {list(AGGREGATORS)}")
  if num_tokens_total is not None and aggregation != "dapo":
    raise ValueError(f"num_tokens_total is the dapo divisor; not used by "
                     f"aggregation={aggregation!r}")
  m = jnp.asarray(mask, jnp.float32)
  weighted = jnp.where(m > 0, per_token * m, 0.0)
  return AGGREGATORS[aggregation](weighted, m, max_len, num_tokens_total)


def policy_loss(log_probs, old_log_probs, advantages, mask, *, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, importance: str = "token",
                aggregation: str = "grpo", max_len: int | None = None, num_tokens_total=None,
                ref_log_probs=None, beta: float = 0.0, kl_estimator: str = "k3"):
  """Clipped surrogate loss (scalar) and metrics; see the module docstring.

  log_probs / old_log_probs (/ ref_log_probs): [N, L] per-token log-probs under θ, the
  sampling policy θold (and πref); advantages [N] (one per completion) or [N, L] (per
  token: process_advantages); mask [N, L]. clip_eps_high None ->
  clip_eps. ref_log_probs is only read when beta != 0. At ρ = 1 the gradient is the
  REINFORCE gradient −A ∇lp aggregated the same way.
  """
  f32 = jnp.float32
  lp = jnp.asarray(log_probs, f32)
  old = jnp.asarray(old_log_probs, f32)
  if lp.ndim != 2 or old.shape != lp.shape or jnp.shape(mask) != lp.shape:
    raise ValueError(f"log_probs, old_log_probs and mask must all be [N, L]; got {lp.shape}, "
                     f"{old.shape}, {jnp.shape(mask)}")
  adv = jnp.asarray(advantages, f32)
  if adv.shape == lp.shape[:1]:
    adv = adv[:, None]
  elif adv.shape != lp.shape:
    raise ValueError(f"advantages must be [N]={lp.shape[:1]} or [N, L]={lp.shape}, got "
                     f"{adv.shape}")
  m = jnp.asarray(mask, f32)
  valid = m > 0
  lp, old = jnp.where(valid, lp, 0.0), jnp.where(valid, old, 0.0)  # padding may hold NaN
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high

  if importance not in IMPORTANCE:
    raise ValueError(f"unknown importance {importance!r}; expected one of {sorted(IMPORTANCE)}")
  ratio = jnp.exp(IMPORTANCE[importance](lp - old, lp, m))
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)

  metrics = {}
  if beta != 0.0:
    if ref_log_probs is None:
      raise ValueError(f"beta={beta} needs ref_log_probs")
    ref = jnp.asarray(ref_log_probs, f32)
    if ref.shape != lp.shape:
      raise ValueError(f"ref_log_probs must be {lp.shape}, got {ref.shape}")
    kl = kl_estimate(lp, jnp.where(valid, ref, 0.0), kl_estimator)
    per_token = per_token + beta * kl
    metrics["kl"] = _masked_mean(kl, m)
  else:
    _check_kl_estimator(kl_estimator)

  loss = aggregate_tokens(per_token, m, aggregation, max_len=max_len,
                          num_tokens_total=num_tokens_total)
  r = jax.lax.stop_gradient(ratio)
  low = ((r < 1.0 - eps_low) & (adv < 0)).astype(f32)
  high = ((r > 1.0 + eps_high) & (adv > 0)).astype(f32)
  metrics.update({
      "loss": loss,
      "clip_ratio_low": _masked_mean(low, m),
      "clip_ratio_high": _masked_mean(high, m),
      "clip_ratio": _masked_mean(low + high, m),
      "ratio_mean": _masked_mean(r, m),
  })
  return loss, metrics


# --------------------------------------------------------------------------- presets

# name -> kwargs of policy_loss, plus the advantages() settings "advantage" (estimator)
# and "scale_rewards" (None: the estimator's own default).
ADVANTAGE_KEYS = ("advantage", "scale_rewards")
LOSSES: dict[str, dict] = {
    "grpo": dict(advantage="grpo", scale_rewards=None, importance="token", aggregation="grpo",
                 clip_eps=0.2, clip_eps_high=None),
    "bnpo": dict(advantage="grpo", scale_rewards=None, importance="token", aggregation="bnpo",
                 clip_eps=0.2, clip_eps_high=None),
    "dapo": dict(advantage="grpo", scale_rewards=None, importance="token", aggregation="dapo",
                 clip_eps=0.2, clip_eps_high=0.28, beta=0.0),
    "dr_grpo": dict(advantage="dr_grpo", scale_rewards=None, importance="token",
                    aggregation="dr_grpo", clip_eps=0.2, clip_eps_high=None),
    "gspo": dict(advantage="grpo", scale_rewards=None, importance="sequence",
                 aggregation="grpo", clip_eps=3e-4, clip_eps_high=4e-4),
}


def preset(name: str) -> dict:
  """A copy of LOSSES[name]: the ADVANTAGE_KEYS go to advantages(), the rest to policy_loss."""
  if name not in LOSSES:
    raise ValueError(f"unknown GRPO loss preset {name!r}; known: {sorted(LOSSES)}")
  return dict(LOSSES[name])


# The config.objective keys that override a preset: the advantage settings and every
# keyword of policy_loss a config can set (the rest come from the batch or from beta).
OVERRIDABLE = ADVANTAGE_KEYS + tuple(
    k for k, p in inspect.signature(policy_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k not in ("max_len", "num_tokens_total", "ref_log_probs",
                                              "beta"))


def settings(o) -> dict:
  """The objective block of a config -> the preset `o.loss` with the keys of OVERRIDABLE
  that `o` sets (None, "", -1 mean unset) and beta: advantages() and policy_loss kwargs."""
  kw = preset(o.loss)
  for k in OVERRIDABLE:
    v = o.get(k)
    if v not in (None, "", -1, -1.0):
      kw[k] = v
  kw["beta"] = o.beta
  return kw


# --------------------------------------------------------------------------- DAPO helpers


def dynamic_sampling_keep(rewards, group_size: int) -> jax.Array:
  """bool [num_groups]: groups whose rewards are not all equal (DAPO dynamic sampling;
  an all-equal group has zero advantage and gives no gradient)."""
  n = jnp.shape(rewards)[0]
  if n % group_size:
    raise ValueError(f"{n} rewards are not whole groups of group_size={group_size}")
  g = jnp.asarray(rewards).reshape(-1, group_size)
  return jnp.max(g, axis=1) != jnp.min(g, axis=1)


def overlong_filter_mask(truncated) -> jax.Array:
  """float [N]: 0 for truncated completions, 1 otherwise; multiply into the token mask
  (mask * f[:, None]) so that truncated completions drop out of the loss (DAPO)."""
  return 1.0 - jnp.asarray(truncated).astype(jnp.float32)


def soft_overlong_punishment(lengths, max_len: int, cache_len: int) -> jax.Array:
  """float [N] DAPO length penalty, added to the reward:
  0 if len <= max_len − cache_len; ((max_len − cache_len) − len) / cache_len while in the
  last cache_len tokens; −1 beyond max_len."""
  if not 0 < cache_len <= max_len:
    raise ValueError(f"need 0 < cache_len <= max_len; got cache_len={cache_len}, "
                     f"max_len={max_len}")
  n = jnp.asarray(lengths, jnp.float32)
  start = max_len - cache_len
  return jnp.where(n <= start, 0.0, jnp.where(n <= max_len, (start - n) / cache_len, -1.0))


def fill_batch(generate: Callable[[int], tuple], group_size: int, target_groups: int,
               max_rounds: int = 8) -> tuple[dict, dict]:
  """DAPO dynamic sampling on the host: (batch, info).

  Calls generate(round) -> (rewards [n], payload {key: array [n, ...]}), group-contiguous,
  until `target_groups` groups with unequal rewards are kept or `max_rounds` calls were
  made. batch: the payload rows of the kept groups, in generation order, sliced to
  target_groups · G rows (the surplus of the last round is dropped, so the batch size
  stays fixed). info: "rewards" (of the batch rows), "num_groups", "complete" (False when
  max_rounds ran out first: then num_groups < target_groups), "rounds",
  "generated_groups", "kept_groups" (over all rounds, before slicing), "kept_fraction".
  """
  if target_groups < 1 or max_rounds < 1:
    raise ValueError(f"need target_groups >= 1 and max_rounds >= 1; got {target_groups}, "
                     f"{max_rounds}")
  rewards_parts, payload_parts = [], []
  kept = generated = rounds = 0
  while rounds < max_rounds and kept < target_groups:
    rewards, payload = generate(rounds)
    rounds += 1
    rewards = np.asarray(rewards)
    n = rewards.shape[0]
    if rewards.ndim != 1 or n % group_size:
      raise ValueError(f"generate returned rewards of shape {rewards.shape}; expected [n] "
                       f"with n a multiple of group_size={group_size}")
    for key, value in payload.items():
      if np.shape(value)[:1] != (n,):
        raise ValueError(f"payload[{key!r}] has shape {np.shape(value)}; expected leading "
                         f"dim {n} (one row per completion)")
    groups = np.flatnonzero(np.asarray(dynamic_sampling_keep(rewards, group_size)))
    generated += n // group_size
    kept += len(groups)
    rows = (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)
    rewards_parts.append(rewards[rows])
    payload_parts.append({k: np.asarray(v)[rows] for k, v in payload.items()})
  num = min(kept, target_groups)
  rows = num * group_size
  batch = {k: np.concatenate([p[k] for p in payload_parts])[:rows] for k in payload_parts[0]}
  info = {"rewards": np.concatenate(rewards_parts)[:rows], "num_groups": num,
          "complete": kept >= target_groups, "rounds": rounds, "generated_groups": generated,
          "kept_groups": kept, "kept_fraction": kept / generated}
  return batch, info


class DynamicSampler:
  """fill_batch with fixed settings and running totals for logging."""

  def __init__(self, group_size: int, target_groups: int, max_rounds: int = 8):
    self.group_size, self.target_groups, self.max_rounds = group_size, target_groups, max_rounds
    self.totals = {"batches": 0, "incomplete": 0, "rounds": 0, "generated_groups": 0,
                   "kept_groups": 0}

  def fill(self, generate: Callable[[int], tuple]) -> tuple[dict, dict]:
    batch, info = fill_batch(generate, self.group_size, self.target_groups, self.max_rounds)
    t = self.totals
    t["batches"] += 1
    t["incomplete"] += int(not info["complete"])
    for k in ("rounds", "generated_groups", "kept_groups"):
      t[k] += info[k]
    return batch, info

  def stats(self) -> Mapping[str, float]:
    t = self.totals
    return {**t, "kept_fraction": t["kept_groups"] / max(t["generated_groups"], 1)}


# --------------------------------------------------------------------------- RAFT


def raft_select(rewards, group_size: int, keep: int = 1) -> np.ndarray:
  """Flat indices of the `keep` best completions of every group, best first, ties to the
  earlier one (RAFT, Dong et al. 2023: finetune on them with sft_loss)."""
  return select_top(np.asarray(rewards), group_size, keep)


def sft_loss(log_probs, mask) -> jax.Array:
  """−Σ m lp / Σ m: negative masked token-mean log-likelihood."""
  m = jnp.asarray(mask, jnp.float32)
  lp = jnp.where(m > 0, jnp.asarray(log_probs, jnp.float32), 0.0)
  return -_masked_mean(lp, m)


# --------------------------------------------------------------------------- registration


def _check_grpo(config):
  preset(config.objective.loss)  # an unknown name lists the known ones
  if config.objective.get("process_rewards", False):
    from rft.rewards import base as rewards_base  # pylint: disable=g-import-not-at-top
    names = list(rewards_base.parse_spec(config.reward))
    if config.objective.importance == "sequence" or preset(config.objective.loss).get(
        "importance") == "sequence":
      raise ValueError("config.objective.process_rewards needs token-level importance "
                       f"ratios; config.objective.loss={config.objective.loss!r} uses the "
                       f"sequence ratio")
    if len(names) != 1:
      raise ValueError(f"config.objective.process_rewards takes one dense reward; "
                       f"config.reward={config.reward!r} has {len(names)} terms")
  if config.group_size < 2:
    raise ValueError(f"config.group_size={config.group_size}: group-relative advantages need "
                     f"at least 2 completions per prompt")


def _prepare_grpo(config, kw, rollout, group_size, term_weights):
  """Advantages per completion (of the summed reward, or each term normalised within its
  group first) and the loss weights (0 for truncated completions with overlong_filter)."""
  weight = np.ones(len(rollout["rewards"]), np.float32)
  if config.objective.overlong_filter:
    weight = np.asarray(overlong_filter_mask(rollout["truncated"]), np.float32)
  if config.objective.get("process_rewards", False):
    adv = process_advantages(rollout["step_rewards"], rollout["step_tokens"], group_size,
                             rollout["completion"].shape[1])
  elif config.reward_aggregation == "normalize_then_sum":
    adv, _ = aggregate(rollout["reward_terms"], term_weights, group_size, "normalize_then_sum")
  else:
    adv, _ = advantages(jnp.asarray(rollout["rewards"]), group_size, kw["advantage"],
                        kw["scale_rewards"])
  return {"loss_weight": weight, "advantages": np.asarray(adv, np.float32)}, {}


def _grpo_loss(kw, log_probs, mask, batch):
  extra = {}
  if kw["aggregation"] == "dapo" and "step_loss_tokens" in batch:
    # the whole step's loss tokens (every row holds the same count): module docstring
    extra["num_tokens_total"] = batch["step_loss_tokens"][0]
  return policy_loss(log_probs, batch["old_log_probs"], batch["advantages"], mask,
                     ref_log_probs=batch.get("ref_log_probs"),
                     max_len=batch["completion"].shape[1], **extra,
                     **{k: v for k, v in kw.items() if k not in ADVANTAGE_KEYS})


def _prepare_raft(config, kw, rollout, group_size, term_weights):
  """Weight 1 on the best `keep` completions of each group whose reward beats min_reward."""
  o, rewards = config.objective, rollout["rewards"]
  keep = np.asarray(raft_select(rewards, group_size, o.keep))
  keep = keep[rewards[keep] > o.min_reward]  # a group's best can still be wrong
  weight = np.zeros(len(rewards), np.float32)
  weight[keep] = 1.0
  return {"loss_weight": weight}, {
      "kept_fraction": len(keep) / len(rewards),
      "kept_reward_mean": float(rewards[keep].mean()) if len(keep) else 0.0}


registry.register_lm(registry.LMObjective(
    name="grpo", summary="clipped group-relative policy loss; objective.loss picks the variant "
                         f"({', '.join(sorted(LOSSES))})",
    settings=settings, check=_check_grpo, prepare=_prepare_grpo, loss=_grpo_loss,
    uses_reference=lambda kw: kw["beta"] > 0,
    dynamic_sampling=lambda config: bool(config.objective.dynamic_sampling),
    label=lambda config: config.objective.loss))

registry.register_lm(registry.LMObjective(
    name="raft", summary="SFT on the best completions of each group (Dong et al. 2023)",
    settings=lambda o: {}, prepare=_prepare_raft,
    loss=lambda kw, log_probs, mask, batch: (sft_loss(log_probs, mask), {}),
    label=lambda config: "sft"))
