"""Reward-model losses and evaluation metrics: pure functions over arrays.

Losses (jax, differentiable, mean over the rows with a nonzero weight):

* `bradley_terry_loss`: pairs (chosen, rejected) with an optional per-pair margin and a
  soft label (ties):  -[p log σ(r_c - r_r - m) + (1 - p) log σ(-(r_c - r_r - m))].
* `regression_loss`: ratings, (r - y)^2 (MSE).
* `combined_loss`: w_bt * BT + w_reg * MSE.

Metrics (numpy, host): `pairwise_accuracy`, `expected_calibration_error` of
σ(r_c - r_r), `accuracy_by_category` (a RewardBench-style per-category report).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Llama 2 (Touvron et al. 2023, §3.2.2, "preference rating-based margin"): margin m(r) per rater preference level, in the
# "small" and "large" variants. Levels: 0 significantly better, 1 better, 2 slightly
# better, 3 negligibly better / unsure.
LLAMA2_MARGINS = {"small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
                  "large": (3.0, 2.0, 1.0, 0.0)}


def _weighted_mean(x, weight):
  if weight is None:
    return jnp.mean(x)
  w = jnp.asarray(weight, jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-12)


def bradley_terry_loss(r_chosen, r_rejected, margin=None, label=None, weight=None):
  """Bradley–Terry negative log-likelihood of preference pairs (one scalar).

      d = r_c - r_r - m
      loss = -[p log σ(d) + (1 - p) log σ(-d)]       (mean over pairs, weighted)

  Bradley & Terry (1952); as the reward-model loss of InstructGPT (Ouyang et al. 2022):
  p = 1, m = 0, i.e. -log σ(r_c - r_r). Llama 2 (Touvron et al. 2023, eq. 2) adds a
  margin m(r) that grows with how clearly the raters preferred the chosen response
  (`LLAMA2_MARGINS`): -log σ(r_c - r_r - m(r)). A tie is the soft label p = 1/2:
  -½ log σ(d) - ½ log σ(-d), minimised at d = 0 (give ties m = 0). `label` p ∈ [0, 1]
  (default 1), `margin` m (default 0), `weight` per pair (default 1; e.g. the preference
  strength |Δ| of HelpSteer2-Preference's "scaled BT"). All [N] arrays, float32.
  log σ is computed as `jax.nn.log_sigmoid` (finite for any d).
  """
  r_chosen = jnp.asarray(r_chosen, jnp.float32)
  d = r_chosen - jnp.asarray(r_rejected, jnp.float32)
  if margin is not None:
    d = d - jnp.asarray(margin, jnp.float32)
  p = jnp.ones_like(d) if label is None else jnp.asarray(label, jnp.float32)
  nll = -(p * jax.nn.log_sigmoid(d) + (1.0 - p) * jax.nn.log_sigmoid(-d))
  return _weighted_mean(nll, weight)


def regression_loss(r, rating, weight=None):
  """Mean squared error of rewards against ratings: mean (r - y)^2 (weighted).

  The regression reward model of SteerLM / HelpSteer (Dong et al. 2023; Wang et al.
  2023, 2024): the reward head predicts an absolute rating instead of a preference."""
  err = jnp.asarray(r, jnp.float32) - jnp.asarray(rating, jnp.float32)
  return _weighted_mean(err * err, weight)


def combined_loss(bt: jax.Array, regression: jax.Array, bt_weight: float = 1.0,
                  regression_weight: float = 1.0):
  """w_bt * BT + w_reg * MSE: a weighted sum of a pair batch's `bradley_terry_loss` and a
  rating batch's `regression_loss`.

  HelpSteer2-Preference (Wang et al. 2024, arXiv:2410.01257) trains both kinds of reward
  model on one data set that has both preferences and ratings and combines them (its
  best model: a regression model's head, then Bradley–Terry finetuning on top); this
  is the simplest form of the combination, both objectives on one head at once, with
  the weights as knobs (regression_weight 0 is plain BT, bt_weight 0 plain regression)."""
  return bt_weight * bt + regression_weight * regression


def llama2_margin(level, variant: str = "small") -> np.ndarray:
  """m(r) of Llama 2 for preference levels (0 significantly better ... 3 negligibly
  better / unsure); variant "small" or "large" (`LLAMA2_MARGINS`)."""
  if variant not in LLAMA2_MARGINS:
    raise ValueError(f"Llama 2 margin variant {variant!r}; use {sorted(LLAMA2_MARGINS)}")
  return np.asarray(LLAMA2_MARGINS[variant], np.float32)[np.asarray(level, np.int64)]


# --------------------------------------------------------------------------- metrics

def pairwise_accuracy(r_chosen, r_rejected, label=None) -> float:
  """Fraction of strict pairs (label > 1/2; ties are left out) with r_c > r_r; an exact
  equality r_c == r_r counts one half (a reward that cannot tell scores 0.5). NaN when
  there is no strict pair."""
  rc, rr = np.asarray(r_chosen, np.float64), np.asarray(r_rejected, np.float64)
  keep = np.ones(rc.shape, bool) if label is None else np.asarray(label) > 0.5
  if not keep.any():
    return float("nan")
  won = (rc > rr).astype(np.float64) + 0.5 * (rc == rr)
  return float(won[keep].mean())


def expected_calibration_error(r_chosen, r_rejected, label=None, bins: int = 10) -> float:
  """Expected calibration error of P(chosen preferred) = σ(r_c - r_r), on strict pairs.

  Each pair's prediction is the side with P ≥ 1/2, its confidence c = max(P, 1 - P) ∈
  [1/2, 1], correct when that side is the labelled winner. Confidences are binned into
  `bins` equal bins over [1/2, 1] (1 in the last bin), and

      ECE = Σ_b (n_b / N) |accuracy_b - mean confidence_b|

  (Naeini et al. 2015; Guo et al. 2017), the form used for reward-model calibration
  (e.g. Leng et al. 2024, "Taming overconfidence in LLMs: reward calibration in RLHF").
  A pair at exactly P = 1/2 counts as half correct. NaN when there is no strict pair."""
  rc, rr = np.asarray(r_chosen, np.float64), np.asarray(r_rejected, np.float64)
  keep = np.ones(rc.shape, bool) if label is None else np.asarray(label) > 0.5
  if not keep.any():
    return float("nan")
  p = 1.0 / (1.0 + np.exp(-(rc - rr)[keep]))
  conf = np.maximum(p, 1.0 - p)
  correct = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
  idx = np.minimum(((conf - 0.5) * 2 * bins).astype(np.int64), bins - 1)
  ece = 0.0
  for b in range(bins):
    sel = idx == b
    if sel.any():
      ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
  return float(ece)


def accuracy_by_category(r_chosen, r_rejected, categories: Sequence[Mapping[str, str]],
                         label=None) -> dict:
  """{"<key>=<value>": {"accuracy": pairwise accuracy, "pairs": count}} for every
  category key of every pair (e.g. operator=*, difficulty=3 digits), strict pairs only,
  sorted by name: the per-category table of RewardBench (Lambert et al. 2024)."""
  rc, rr = np.asarray(r_chosen), np.asarray(r_rejected)
  lab = np.ones(len(rc)) if label is None else np.asarray(label)
  groups: dict[str, list[int]] = {}
  for i, cats in enumerate(categories):
    for k, v in dict(cats).items():
      groups.setdefault(f"{k}={v}", []).append(i)
  out = {}
  for name in sorted(groups):
    ids = np.asarray(groups[name])
    strict = ids[lab[ids] > 0.5]
    if len(strict):
      out[name] = {"accuracy": pairwise_accuracy(rc[strict], rr[strict]),
                   "pairs": int(len(strict))}
  return out
