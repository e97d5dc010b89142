"""Reward shaping: pure functions that transform reward values, and the PAR wrapper that
applies one to a registered reward from its config options.

Outcome rewards (one score per sample)
--------------------------------------
* **PAR**, Preference As Reward (Fu et al. 2025, "Reward Shaping to Mitigate Reward
  Hacking in RLHF", arXiv:2502.18770; reference code github.com/PorUna-byte/PAR,
  ``RewardShaper.calculate_relative_sigmoid``): with the rewards r_ref,1..M of M
  reference responses to the same prompt (the SFT / base policy's samples, scored by the
  same reward model),

      r_PAR = (1/M) Σ_m σ(k · (r − r_ref,m)),        k = 1 in the paper

  the reward model's own Bradley–Terry probability that the sample beats a reference:
  bounded in (0, 1), centred (0.5 at the reference), fast growth near the reference and
  slow saturation above it. The paper finds one reference enough (M = 1); its code
  averages over up to 10 (``--reward_maxref``) and ablates k ∈ {1, 2, 3}
  (``--sigmoid_k``).

Process rewards (one score per reasoning step, rewards [B, S] with a step mask [B, S]
whose valid steps come first in each row)
------------------------------------------
* **Clip** (Gao et al. 2024, "On Designing Effective RL Reward at Training Time for LLM
  Reasoning", arXiv:2410.15115): r̃_k = min(r_k − η, 0). Every step reward is ≤ 0, so the
  return of a trajectory is bounded above by 0 and repeating "good" steps earns nothing.
* **Delta** (same paper): r̃_k = r_k − r_{k+1} for k < K, r̃_K = r_K (K the last step).
  The return from step t telescopes to Σ_{k≥t} r̃_k = r_t, one step's score, however long
  the trajectory. The paper also combines the two (Clip first, then Delta).
* **Min-form credit assignment** (Cheng et al. 2025, "Stop Summation: Min-Form Credit
  Assignment Is All Process Reward Model Needs for Reasoning", PURE, arXiv:2504.15275):
  the value of step t is the minimum of the future process rewards,
  G_t = min_{k≥t} r_k, instead of the (γ-discounted) sum. Its code (github.com/
  CJReinforce/PURE, ``turn_process_reward_logits_to_reward``) realises this inside a
  sum-form RL trainer by re-weighting each step's reward with a softmin over the steps of
  the trajectory, r*_k = softmax_j(−r_j / T)_k · r_k with T = 0.1, so that Σ_k r*_k → min_k
  r_k as T → 0: `min_form_returns` is the definition, `pure_softmin_rewards` the code's
  transform.

Several rewards
---------------
* **Per-component vs summed normalisation** (`multi_reward_normalize`): "sum then
  normalise" (GRPO) z-scores s = Σ_k w_k r_k within each group; "normalise then sum" is
  GDPO's group reward-decoupled normalisation ("GDPO: Group reward-Decoupled
  Normalization Policy Optimization", also TRL's ``multi_objective_aggregation``): each
  reward is z-scored within its group, ñ_k = (r_k − mean_g r_k) / (std_g r_k + eps), the
  weighted sum s = Σ_k w_k ñ_k is then z-scored over the whole batch. A reward that is
  constant in a group contributes 0 there instead of vanishing into, or dominating, the
  sum by its scale. rft.objectives.grpo.aggregate computes GDPO's advantages for the LM
  loop; this is the same definition as a plain function of a reward matrix, with the
  scope (group or batch) and the final batch z-score as options.
* **Directional preference weights** (DPA; Wang et al. 2024, "Arithmetic Control of LLMs
  for Diverse User Preferences: Directional Preference Alignment with Multi-Objective
  Rewards", arXiv:2402.18571): a user preference is a unit vector v in reward space,
  for two rewards v = (cos θ, sin θ), and the scalar reward is v · (r_1, r_2). Training
  samples a direction per prompt (and conditions the prompt on it); `sample_angles`
  draws θ uniformly from a configured range. The default range [−π/4, π/4] is this
  module's choice, not a value from the paper.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------- PAR


def par(rewards, reference, k: float = 1.0):
  """PAR: (1/M) Σ_m σ(k (r − r_ref,m)) per sample.

  rewards [N]; reference a number or [M] (the same M reference rewards for every sample)
  or [N, M] (M references per sample; one reference per sample is [N, 1]). Returns [N]
  float32 in (0, 1).
  """
  r = jnp.asarray(rewards, jnp.float32)
  ref = jnp.asarray(reference, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f"par: rewards must be [N]; got shape {r.shape}")
  if ref.ndim == 0:
    ref = ref[None, None]
  elif ref.ndim == 1:
    ref = ref[None, :]
  elif ref.ndim != 2 or ref.shape[0] != r.shape[0]:
    raise ValueError(f"par: reference must be a number, [M] or [N, M] with N={r.shape[0]}; "
                     f"got shape {ref.shape}")
  if ref.shape[1] == 0:
    raise ValueError("par: no reference rewards (M = 0)")
  return jnp.mean(jax.nn.sigmoid(k * (r[:, None] - ref)), axis=1)


# --------------------------------------------------------------------------- process rewards


def _mask(rewards, mask):
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"process rewards must be [B, S]; got shape {r.shape}")
  m = jnp.ones(r.shape, bool) if mask is None else jnp.asarray(mask, bool)
  if m.shape != r.shape:
    raise ValueError(f"mask shape {m.shape} != process rewards shape {r.shape}")
  return r, m


def clip_process_rewards(rewards, eta: float, mask=None):
  """Gao et al.'s Clip: min(r_k − η, 0) at valid steps, 0 at padding. [B, S]."""
  r, m = _mask(rewards, mask)
  return jnp.where(m, jnp.minimum(r - eta, 0.0), 0.0)


def delta_process_rewards(rewards, mask=None):
  """Gao et al.'s Delta: r_k − r_{k+1} for every valid step but the last of its row, the
  last valid step keeps r_K, padding 0. [B, S] (valid steps first in each row)."""
  r, m = _mask(rewards, mask)
  nxt = jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)
  has_next = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  return jnp.where(m, jnp.where(has_next, r - nxt, r), 0.0)


def sum_returns(rewards, mask=None, gamma: float = 1.0):
  """Sum-form returns G_t = Σ_{k≥t} γ^{k−t} r_k over valid steps; 0 at padding. [B, S]."""
  r, m = _mask(rewards, mask)
  r = jnp.where(m, r, 0.0)

  def step(carry, x):
    g = x + gamma * carry
    return g, g

  _, g = jax.lax.scan(step, jnp.zeros(r.shape[0], r.dtype), r.T, reverse=True)
  return jnp.where(m, g.T, 0.0)


def min_form_returns(rewards, mask=None):
  """PURE's min-form returns G_t = min_{k≥t, valid} r_k; 0 at padding. [B, S]."""
  r, m = _mask(rewards, mask)
  g = jax.lax.cummin(jnp.where(m, r, jnp.inf), axis=1, reverse=True)
  return jnp.where(m, g, 0.0)


def pure_softmin_rewards(rewards, mask=None, temperature: float = 0.1):
  """PURE's transform for sum-form trainers: r*_k = softmax_j(−r_j / T)_k · r_k over the
  valid steps of each row (0 at padding), so Σ_k r*_k → min_k r_k as T → 0. [B, S]."""
  if not temperature > 0:
    raise ValueError(f"pure_softmin_rewards: temperature must be > 0; got {temperature}")
  r, m = _mask(rewards, mask)
  w = jax.nn.softmax(jnp.where(m, -r / temperature, -jnp.inf), axis=1)
  return jnp.where(m, w * r, 0.0)


# --------------------------------------------------------------------------- several rewards

NORMALIZE_ORDERS = ("sum_then_normalize", "normalize_then_sum")


def zscore(x, axis, scale: bool = True, eps: float = 1e-4):
  """(x − mean) / (std + eps) along `axis` (std with ddof = 1); x − mean without `scale`."""
  c = x - x.mean(axis=axis, keepdims=True)
  if not scale:
    return c
  return c / (jnp.std(x, axis=axis, ddof=1, keepdims=True) + eps)


def multi_reward_normalize(rewards, weights, *, order: str = "normalize_then_sum",
                           group_size: int | None = None, scale: bool = True,
                           batch_renorm: bool = True, eps: float = 1e-4):
  """One normalised reward [N] from R rewards [N, R] with weights [R].

  Normalising a set x means (x − mean) / (std + eps) (std with ddof = 1, as torch's and
  rft.objectives.grpo's), or only x − mean when ``scale`` is False. The set is each group
  of ``group_size`` consecutive rows (samples of one prompt), or the whole batch when
  ``group_size`` is None.

  * order="sum_then_normalize": normalise s = Σ_k w_k r_k (GRPO's advantage of the sum).
  * order="normalize_then_sum": normalise each column r_k, then s = Σ_k w_k ñ_k, then
    (``batch_renorm``, GDPO) normalise s once more over the whole batch.
  """
  x = jnp.asarray(rewards, jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  if x.ndim != 2 or w.shape != (x.shape[1],):
    raise ValueError(f"rewards must be [N, R] and weights [R]; got {x.shape} and {w.shape}")
  if order not in NORMALIZE_ORDERS:
    raise ValueError(f"unknown order {order!r}; expected one of {NORMALIZE_ORDERS}")
  n = x.shape[0]
  g = n if group_size is None else int(group_size)
  if g < 2 or n % g:
    raise ValueError(f"group_size={group_size}: need groups of at least 2 rows dividing "
                     f"the {n} rows")
  groups = x.reshape(n // g, g, x.shape[1])
  if order == "sum_then_normalize":
    return zscore(groups @ w, 1, scale, eps).reshape(n)
  s = (zscore(groups, 1, scale, eps) @ w).reshape(n)
  return zscore(s, 0, True, eps) if batch_renorm else s


def direction(theta):
  """DPA's unit preference vector v = (cos θ, sin θ): [..., 2] for angles θ [...]."""
  t = jnp.asarray(theta, jnp.float32)
  return jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)


def sample_angles(key, num_prompts: int, theta_range: Sequence[float] = (-math.pi / 4,
                                                                          math.pi / 4)):
  """θ per prompt, uniform in theta_range = (low, high) radians: [num_prompts]."""
  lo, hi = (float(v) for v in theta_range)
  if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
    raise ValueError(f"theta_range must be finite (low, high) with low <= high; got "
                     f"{tuple(theta_range)}")
  return jax.random.uniform(key, (num_prompts,), jnp.float32, lo, hi)


def directional_reward(rewards, directions, group_size: int = 1):
  """DPA's reward v · r per sample: rewards [N, k], directions [N / group_size, k] (one
  per prompt, repeated over its group_size consecutive samples). Returns [N]."""
  r = jnp.asarray(rewards, jnp.float32)
  v = jnp.asarray(directions, jnp.float32)
  if r.ndim != 2 or v.ndim != 2 or v.shape[1] != r.shape[1] or \
      v.shape[0] * group_size != r.shape[0]:
    raise ValueError(f"rewards [N, k] and directions [N / group_size, k] expected; got "
                     f"{r.shape}, {v.shape} with group_size={group_size}")
  return jnp.sum(r * jnp.repeat(v, group_size, axis=0), axis=1)


# --------------------------------------------------------------------------- config wrapper

SHAPINGS = ("par",)
# Keys of config.reward_options.<name> that belong to the shaping, not to the factory.
SHAPING_KEYS = ("shaping", "shaping_reference", "shaping_k")


def split_options(options: Mapping[str, Any]) -> tuple[dict, dict]:
  """(factory options, shaping options) of one reward's config options."""
  own = {k: v for k, v in options.items() if not k.startswith("shaping")}
  shaping = {k: v for k, v in options.items() if k.startswith("shaping")}
  return own, shaping


def _reference_table(ref, where: str):
  """The reference option as float32 [M] (shared) or [P, M] (per prompt id) and a flag."""
  key = f"{where}.shaping_reference"
  if isinstance(ref, str):
    from rft import paths  # pylint: disable=g-import-not-at-top
    if not paths.path(ref).exists():
      raise FileNotFoundError(f"{key}={ref!r}: no such file (expected a .npy or .json of "
                              f"reference rewards [num_prompts] or [num_prompts, M])")
    if ref.endswith(".npy"):
      import io  # pylint: disable=g-import-not-at-top
      table = np.load(io.BytesIO(paths.path(ref).read_bytes()), allow_pickle=False)
    elif ref.endswith(".json"):
      table = paths.read_json(ref)
    else:
      raise ValueError(f"{key}={ref!r}: expected a .npy or .json file")
    try:
      table = np.asarray(table, np.float32)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{key}={ref!r}: not a [num_prompts] or [num_prompts, M] array of "
                       f"numbers ({e})") from None
    if table.ndim == 1:
      table = table[:, None]
    if table.ndim != 2 or table.size == 0:
      raise ValueError(f"{key}={ref!r}: expected [num_prompts] or [num_prompts, M]; got "
                       f"shape {table.shape}")
    per_prompt = True
  else:
    try:
      table = np.asarray(ref, np.float32).reshape(-1)
    except (TypeError, ValueError):
      raise ValueError(f"{key}={ref!r}: expected a number, a list of numbers or a .npy / "
                       f".json file of per-prompt references") from None
    if table.size == 0:
      raise ValueError(f"{key}: no reference rewards given")
    per_prompt = False
  if not np.all(np.isfinite(table)):
    raise ValueError(f"{key}: reference rewards must be finite")
  return table, per_prompt


def apply(reward, options: Mapping[str, Any], where: str):
  """`reward` shaped as config options ``shaping``, ``shaping_reference``, ``shaping_k``
  say (the keys `split_options` set aside); `reward` itself when there are none.

  shaping="par": shaping_reference is a number (e.g. the base model's mean reward), a list
  of M numbers (the same references for every sample), or a .npy / .json file of
  reference rewards [num_prompts] or [num_prompts, M] looked up by ``prompts["ids"]``
  (the world's prompt index; e.g. the rewards of M base-model samples per prompt).
  shaping_k is PAR's sigmoid slope k (default 1). The shaped reward keeps the name;
  ``parts`` adds ``<name>_unshaped``, the reward before shaping. `where` is the config
  key of the options ("config.reward_options.<name>"); errors name it.
  """
  from rft.rewards.base import Reward  # pylint: disable=g-import-not-at-top
  options = dict(options)
  if not options:
    return reward
  unknown = sorted(set(options) - set(SHAPING_KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown shaping option(s) {unknown}; known: "
                     f"{list(SHAPING_KEYS)}")
  name = options.get("shaping")
  if name is None or name == "":
    raise ValueError(f"{where}: {sorted(options)} given without {where}.shaping; known "
                     f"shapings: {list(SHAPINGS)}")
  if name not in SHAPINGS:
    raise ValueError(f"{where}.shaping={name!r}: unknown shaping; known: {list(SHAPINGS)}")
  if options.get("shaping_reference") is None:
    raise ValueError(f"{where}.shaping='par' needs {where}.shaping_reference (a number, a "
                     f"list of numbers, or a .npy / .json file of per-prompt references)")
  table, per_prompt = _reference_table(options["shaping_reference"], where)
  k = options.get("shaping_k", 1.0)
  if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
    raise ValueError(f"{where}.shaping_k={k!r}: expected a finite number > 0")
  k = float(k)
  inner = reward

  def refs(prompts):
    if not per_prompt:
      return table
    if not isinstance(prompts, Mapping) or "ids" not in prompts:
      raise ValueError(f"{where}.shaping_reference is per prompt, but the reward's prompts "
                       f"carry no 'ids' to look the references up by")
    ids = prompts["ids"]
    if inner.host:
      ids = np.asarray(ids)
      if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
        raise ValueError(f"{where}.shaping_reference has {len(table)} prompts; prompt ids "
                         f"run to {int(ids.max())}")
      return table[ids]
    return jnp.take(jnp.asarray(table), jnp.asarray(ids), axis=0)

  def raw_and_shaped(images, prompts, params):
    raw = inner(images, prompts, params)
    shaped = par(raw, refs(prompts), k)
    if inner.host:
      return np.asarray(raw, np.float32), np.asarray(shaped, np.float32)
    return raw, shaped

  def fn(images, prompts, params=None):
    return raw_and_shaped(images, prompts, params)[1]

  def parts_fn(images, prompts, params=None):
    raw, shaped = raw_and_shaped(images, prompts, params)
    return {inner.name: shaped, f"{inner.name}_unshaped": raw}

  if inner.params is None:
    return Reward(inner.name, lambda images, prompts: fn(images, prompts),
                  differentiable=inner.differentiable, host=inner.host,
                  parts_fn=parts_fn)
  return Reward(inner.name, fn, differentiable=inner.differentiable, host=inner.host,
                params=inner.params, parts_fn=parts_fn)

