"""Pairs of completions of the same prompt: the shared part of the LM pair objectives.

REBEL (rft.objectives.rebel) and CoPG (rft.objectives.copg) both regress, for pairs
(y, y') of completions of one prompt, a difference of sequence-level log-ratios onto the
reward difference:

    ℓ(y, y') = ( s(y) − s(y') − (r(y) − r(y')) )²,   L = mean over the pairs of ℓ

with s(y) = c · Σ_t m_t (log π_θ(y_t | ·) − log π_anchor(y_t | ·)): REBEL anchors to the
sampling policy π_old with c = 1/η, CoPG to the frozen reference π_ref with c = β. The
sums run over the completion's tokens (mask m: completion mask × loss_weight). So
ℓ = (a(y) − a(y'))² with a = s − r, and the loss of a pair is computed from the two
rows' a directly.

Pairing within a group of G completions (`objective.pairs`):

* "all": every unordered pair i < j of the group, G(G − 1)/2 pairs (PRDP's choice, and
  a U-statistic of the two-sample loss: unbiased, lower variance).
* "consecutive": (0, 1), (2, 3), ... of each group, G/2 disjoint pairs, each completion in
  exactly one pair (G must be even). With G = 2 this is the REBEL reference code's
  scheme (two completions per prompt, rows 2k and 2k + 1).

`prepare` gives each row a `pair_group` id (rows pair only with rows of the same id) and
the loss builds the [n, n] mask of pairs i < j with equal ids and both loss weights > 0,
so a minibatch of whole groups holds whole pairs whatever the row order of the step
batch. Rows with loss_weight 0 (e.g. truncated ones under overlong_filter) are in no pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rft.objectives import grpo

PAIRINGS = ("all", "consecutive")


def pair_groups(num_rows: int, group_size: int, pairs: str) -> np.ndarray:
  """int32 [N] pair-group id of each row of a group-contiguous batch (module docstring)."""
  if pairs not in PAIRINGS:
    raise ValueError(f"unknown pairing {pairs!r}; expected one of {PAIRINGS}")
  if group_size < 2 or num_rows % group_size:
    raise ValueError(f"{num_rows} rows are not whole groups of group_size={group_size} >= 2")
  if pairs == "consecutive" and group_size % 2:
    raise ValueError(f"consecutive pairs need an even group_size, got {group_size}")
  rows = np.arange(num_rows)
  return (rows // (group_size if pairs == "all" else 2)).astype(np.int32)


def pair_mask(pair_group, valid) -> jax.Array:
  """bool [n, n]: the pairs i < j with pair_group[i] == pair_group[j], both rows valid."""
  g = jnp.asarray(pair_group)
  v = jnp.asarray(valid, bool)
  n = g.shape[0]
  upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
  return upper & (g[:, None] == g[None, :]) & v[:, None] & v[None, :]


def sequence_sum(x, mask) -> jax.Array:
  """[N] Σ_t m_t x_t over masked tokens (padding may hold anything, NaN included)."""
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.where(m > 0, jnp.asarray(x, jnp.float32) * m, 0.0), axis=1)


def pair_regression(scores, rewards, pair_group, valid):
  """(loss, metrics): mean over the pairs of ((s_i − s_j) − (r_i − r_j))².

  scores s [n] (differentiable), rewards r [n], pair_group [n], valid [n] bool. With no
  pair the loss is 0 (and so is its gradient).
  """
  s = jnp.asarray(scores, jnp.float32)
  r = jnp.asarray(rewards, jnp.float32)
  mask = pair_mask(pair_group, valid)
  count = jnp.sum(mask)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  a = s - r
  residual = a[:, None] - a[None, :]
  loss = jnp.sum(jnp.where(mask, residual ** 2, 0.0)) / denom
  pair_mean = lambda x: jnp.sum(jnp.where(mask, jnp.abs(x), 0.0)) / denom
  sg = jax.lax.stop_gradient
  return loss, {"pairs": count.astype(jnp.float32),
                "reward_diff_abs": pair_mean(r[:, None] - r[None, :]),
                "predicted_diff_abs": pair_mean(sg(s)[:, None] - sg(s)[None, :])}


def ratio_mean(log_probs, old_log_probs, mask) -> jax.Array:
  """Masked token mean of exp(lp − lp_old) (1 exactly at the first inner iteration)."""
  m = jnp.asarray(mask, jnp.float32)
  d = jnp.where(m > 0, jnp.asarray(log_probs, jnp.float32) - old_log_probs, 0.0)
  return jnp.sum(jnp.exp(jax.lax.stop_gradient(d)) * m) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------- record parts


def check(config, name: str) -> None:
  """Checks shared by the pair objectives; errors name the config key."""
  o = config.objective
  if config.group_size < 2:
    raise ValueError(f"config.group_size={config.group_size}: {name} pairs completions of "
                     f"the same prompt and needs at least 2 per prompt")
  if o.pairs not in PAIRINGS:
    raise ValueError(f"config.objective.pairs={o.pairs!r} is not one of {PAIRINGS}")
  if o.pairs == "consecutive" and config.group_size % 2:
    raise ValueError(f"config.objective.pairs='consecutive' pairs rows (0, 1), (2, 3), ... "
                     f"of a group: config.group_size={config.group_size} must be even")
  if o.beta < 0:
    raise ValueError(f"config.objective.beta={o.beta} must be >= 0")
  if o.dynamic_sampling:
    raise ValueError(f"config.objective.dynamic_sampling=True is a GRPO option (groups "
                     f"whose rewards agree carry no GRPO advantage); objective {name!r} "
                     f"trains on every group: set it to False")
  if config.reward_aggregation != "sum_then_normalize":
    raise ValueError(f"config.reward_aggregation={config.reward_aggregation!r} normalises "
                     f"GRPO advantages; {name} regresses the summed reward: use "
                     f"'sum_then_normalize'")
  if o.loss != "grpo":
    raise ValueError(f"config.objective.loss={o.loss!r} picks a GRPO loss preset; it does "
                     f"not apply to objective {name!r}")
  for k in grpo.OVERRIDABLE:
    if o.get(k) not in (None, "", -1, -1.0):
      raise ValueError(f"config.objective.{k}={o.get(k)!r} is a GRPO setting; it does not "
                       f"apply to objective {name!r}")


def prepare(config, kw, rollout, group_size, term_weights):
  """Per row: the reward, the pair-group id and the loss weight (0 for truncated
  completions with objective.overlong_filter)."""
  rewards = np.asarray(rollout["rewards"], np.float32)
  weight = np.ones(len(rewards), np.float32)
  if config.objective.overlong_filter:
    weight = np.asarray(grpo.overlong_filter_mask(rollout["truncated"]), np.float32)
  return {"loss_weight": weight, "rewards": rewards,
          "pair_group": pair_groups(len(rewards), group_size, kw["pairs"])}, {}
