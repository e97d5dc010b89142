"""Reward-model ensembles: combine K reward models' scores [K, N] into one reward [N].

Rules (`combine_scores`; std and variance are over the K members, ddof = 0):

* "mean":            r̄ = (1/K) Σ_k r_k.
* "median":          the members' median (Eisenstein et al. 2023).
* "min":             min_k r_k — worst-case optimisation, WCO (Coste et al. 2023).
* "mean_minus_std":  r̄ − λ σ (Eisenstein et al. 2023, "Helping or Herding? Reward Model
                     Ensembles Mitigate but do not Eliminate Reward Hacking",
                     arXiv:2312.09244): penalise samples the members disagree on.
* "uwo":             r̄ − λ σ² — uncertainty-weighted optimisation, UWO (Coste et al. 2023,
                     "Reward Model Ensembles Help Mitigate Overoptimization",
                     arXiv:2310.02743): the intra-ensemble variance as the penalty.
* "ctrl_u":          exp(−U) r̄ − U with U = λ σ² — Ctrl-U's uncertainty-aware reward (see
                     below) with the ensemble's disagreement as the uncertainty.

Ctrl-U (Zhang et al. 2024, "Ctrl-U: Robust Conditional Image Generation via
Uncertainty-aware Reward Modeling", arXiv:2410.11236; code github.com/grenoble-zhang/
Ctrl-U, train/ctrlu-reward.py) measures a reward model's uncertainty on a sample as the
disagreement of its predictions on two images generated under the same condition,
U = u_scale · Σ_c KL(softmax(ĉ₂) ‖ softmax(ĉ₁)) per pixel, and trains with the loss
exp(−U) · L_reward + U: samples the reward model is unsure of get a smaller weight, and
the U term keeps the uncertainty from growing without bound. Here the disagreement is
across the K ensemble members on one sample (their variance σ², scaled by λ), and the
reward is minus Ctrl-U's loss with L_reward = −r̄: exp(−U) r̄ − U. Like Ctrl-U's
cross-entropy loss this reads best for rewards ≤ 0 (log-probabilities, e.g.
``shapes_alignment_log``): there exp(−U) shrinks the reward of an uncertain sample
towards 0. `uncertainty_weights` gives the weights exp(−λ σ²) alone, to scale a per-sample
loss or advantage with.

Members should score on comparable scales (the same reward model family, e.g. scorers of
different seeds): the rules compare raw values across members.

As a reward (config.reward = "ensemble"), config.reward_options.ensemble holds

* members: the member rewards, each a registered reward name or a mapping {"name": ...,
  <that reward's options>} (shaping options included), e.g.
  ["shapes_alignment_log", {"name": "shapes_alignment_log", "scorer_dir": "seed2/"}];
  a string "a,b,c" lists names;
* combine: one of COMBINE_RULES (default "mean"); lam: λ (default 1).

Its ``parts`` report the combined score under "ensemble", each member under
"ensemble_member<k>", and the members' mean and std under "ensemble_member_mean" and
"ensemble_member_std".
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from rft.rewards.base import Reward, build_term, register

COMBINE_RULES = ("mean", "median", "min", "mean_minus_std", "uwo", "ctrl_u")


def _scores(scores):
  s = jnp.asarray(scores, jnp.float32)
  if s.ndim != 2 or s.shape[0] < 1:
    raise ValueError(f"ensemble scores must be [K, N] with K >= 1; got shape {s.shape}")
  return s


def member_stats(scores):
  """(mean [N], std [N]) over the K members of scores [K, N] (std with ddof = 0)."""
  s = _scores(scores)
  return s.mean(0), s.std(0)


def uncertainty_weights(scores, lam: float = 1.0):
  """Ctrl-U-style per-sample weights exp(−λ σ²) from the members' variance σ² [N]."""
  s = _scores(scores)
  return jnp.exp(-lam * s.var(0))


def combine_scores(scores, rule: str = "mean", lam: float = 1.0):
  """One score per sample [N] from K members' scores [K, N] by `rule` (module docstring)."""
  s = _scores(scores)
  if rule == "mean":
    return s.mean(0)
  if rule == "median":
    return jnp.median(s, axis=0)
  if rule == "min":
    return s.min(0)
  if rule == "mean_minus_std":
    return s.mean(0) - lam * s.std(0)
  if rule == "uwo":
    return s.mean(0) - lam * s.var(0)
  if rule == "ctrl_u":
    u = lam * s.var(0)
    return jnp.exp(-u) * s.mean(0) - u
  raise ValueError(f"unknown ensemble rule {rule!r}; known: {list(COMBINE_RULES)}")


# --------------------------------------------------------------------------- registry

_WHERE = "config.reward_options.ensemble"


def _member_specs(members) -> list[tuple[str, dict]]:
  if isinstance(members, str):
    members = [m.strip() for m in members.split(",") if m.strip()]
  if isinstance(members, Mapping) or not isinstance(members, Sequence):
    raise ValueError(f"{_WHERE}.members={members!r}: expected a list of reward names or "
                     f"{{'name': ..., <options>}} mappings")
  out = []
  for i, m in enumerate(members):
    if isinstance(m, str):
      out.append((m, {}))
    elif isinstance(m, Mapping) and isinstance(m.get("name"), str):
      out.append((m["name"], {k: v for k, v in dict(m).items() if k != "name"}))
    else:
      raise ValueError(f"{_WHERE}.members[{i}]={m!r}: expected a reward name or a mapping "
                       f"with a 'name' key")
  if len(out) < 2:
    raise ValueError(f"{_WHERE}.members: an ensemble needs at least 2 members; got "
                     f"{len(out)}")
  return out


@register("ensemble")
def ensemble_reward(members: Any = (), combine: str = "mean", lam: float = 1.0,
                    shared_kwargs: Mapping[str, Any] | None = None) -> Reward:
  """K member rewards combined per sample by `combine` (COMBINE_RULES) with weight `lam`."""
  if combine not in COMBINE_RULES:
    raise ValueError(f"{_WHERE}.combine={combine!r}: unknown rule; known: "
                     f"{list(COMBINE_RULES)}")
  if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
      or lam < 0:
    raise ValueError(f"{_WHERE}.lam={lam!r}: expected a finite number >= 0")
  lam = float(lam)
  rewards = [build_term(name, opts, shared_kwargs, where=f"{_WHERE}.members[{i}]",
                        origin=f"{_WHERE}.members[{i}]")
             for i, (name, opts) in enumerate(_member_specs(members))]
  host = any(r.host for r in rewards)
  params = (tuple(r.params for r in rewards)
            if any(r.params is not None for r in rewards) else None)

  def member_scores(images, prompts, params):
    ps = params or (None,) * len(rewards)
    if host:
      return np.stack([np.asarray(r(images, prompts, p), np.float32)
                       for r, p in zip(rewards, ps)])
    return jnp.stack([jnp.asarray(r(images, prompts, p), jnp.float32)
                      for r, p in zip(rewards, ps)])

  def out(x):
    return np.asarray(x, np.float32) if host else x

  def fn(images, prompts, params=None):
    return out(combine_scores(member_scores(images, prompts, params), combine, lam))

  def parts_fn(images, prompts, params=None):
    s = member_scores(images, prompts, params)
    mean, std = member_stats(s)
    parts = {"ensemble": out(combine_scores(s, combine, lam))}
    parts.update({f"ensemble_member{k}": out(s[k]) for k in range(len(rewards))})
    parts.update({"ensemble_member_mean": out(mean), "ensemble_member_std": out(std)})
    return parts

  differentiable = all(r.differentiable for r in rewards)
  if params is None:
    return Reward("ensemble", lambda images, prompts: fn(images, prompts),
                  differentiable=differentiable, host=host, parts_fn=parts_fn)
  return Reward("ensemble", fn, differentiable=differentiable, host=host, params=params,
                parts_fn=parts_fn)
