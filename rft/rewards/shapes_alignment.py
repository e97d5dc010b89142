"""ShapesWorld prompt alignment from per-cell attribute distributions.

A caption compiles to assignments A[a, c, k] (rft.data.shapes.Prompt.assignments):
cell c may hold class k under assignment a. Given a classifier's per-cell class
log-probabilities log p_c(k), with cells independent and assignments disjoint,

    P(caption satisfied) = sum_a prod_c sum_k A[a,c,k] p_c(k)

computed in log space (differentiable). The hard check used by the evaluator takes
each cell's argmax class and asks whether any assignment allows all of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rft.rewards.base import Reward, register

_NEG = -1e9  # stands in for log 0; keeps gradients finite where -inf would give NaN


def joint_cell_log_probs(logits: dict) -> jnp.ndarray:
  """Per-cell class log-probs [B, C, K] from factored attribute logits.

  logits: {"occupied": [B,C,2], "color": [B,C,NC], "shape": [B,C,NS], "size": [B,C,NZ]}.
  log p(empty) = log p(occ=0); log p(1 + (col*NS + sh)*NZ + sz) =
  log p(occ=1) + log p(col) + log p(sh) + log p(sz).
  """
  lo = jax.nn.log_softmax(logits["occupied"].astype(jnp.float32))
  lc = jax.nn.log_softmax(logits["color"].astype(jnp.float32))
  ls = jax.nn.log_softmax(logits["shape"].astype(jnp.float32))
  lz = jax.nn.log_softmax(logits["size"].astype(jnp.float32))
  obj = (lc[..., :, None, None] + ls[..., None, :, None] + lz[..., None, None, :])
  obj = obj.reshape(*obj.shape[:-3], -1) + lo[..., 1:2]
  return jnp.concatenate([lo[..., 0:1], obj], axis=-1)


def alignment_log_prob(cell_logp: jnp.ndarray, assignments: jnp.ndarray) -> jnp.ndarray:
  """log P(caption satisfied) [B] from cell_logp [B,C,K] and assignments [B,A,C,K] (bool)."""
  masked = jnp.where(assignments, cell_logp[:, None], _NEG)  # [B, A, C, K]
  per_cell = jax.nn.logsumexp(masked, axis=-1)  # [B, A, C]
  per_assignment = jnp.maximum(per_cell.sum(-1), _NEG)  # [B, A]
  return jax.nn.logsumexp(per_assignment, axis=-1)


def predicted_cells(cell_logp: jnp.ndarray) -> jnp.ndarray:
  """Argmax class per cell [B, C]."""
  return jnp.argmax(cell_logp, axis=-1)


def is_aligned(cells: jnp.ndarray, assignments: jnp.ndarray) -> jnp.ndarray:
  """Bool [B]: does the scene `cells` [B,C] satisfy some assignment [B,A,C,K]?"""
  allowed = jnp.take_along_axis(assignments, cells[:, None, :, None], axis=-1)[..., 0]  # [B,A,C]
  return allowed.all(-1).any(-1)


# --------------------------------------------------------------------------- scorers


@dataclasses.dataclass
class Scorer:
  """A trained attribute classifier: apply(params, images) -> factored logits."""

  name: str
  module: Any
  params: Any

  @classmethod
  def load(cls, name: str, directory: str | None = None) -> "Scorer":
    from rft import pretrained
    from rft.models import scorers
    meta = pretrained.load_meta(name, directory)
    module = scorers.make_scorer(meta["arch"])
    template = jax.eval_shape(module.init, jax.random.key(0),  # shapes only: no compute
                              jnp.zeros((1, 16, 16, 3)))["params"]
    params, _ = pretrained.load_bundle(name, template, directory)
    return cls(name, module, params)

  def cell_log_probs(self, params, images):
    return joint_cell_log_probs(self.module.apply({"params": params}, images))


# --------------------------------------------------------------------------- rewards


def _alignment_reward(name: str, scorer: str, scorer_dir: str | None, log: bool) -> Reward:
  s = Scorer.load(scorer, scorer_dir or None)

  def fn(images, prompts):
    lp = alignment_log_prob(s.cell_log_probs(s.params, images), prompts["assignments"])
    return lp if log else jnp.exp(lp)

  return Reward(name, fn, differentiable=True)


@register("shapes_alignment")
def shapes_alignment_reward(scorer_dir: str | None = None) -> Reward:
  """P(caption satisfied) in [0, 1] under the `shapes_reward` classifier (differentiable)."""
  return _alignment_reward("shapes_alignment", "shapes_reward", scorer_dir, log=False)


@register("shapes_alignment_log")
def shapes_alignment_log_reward(scorer_dir: str | None = None) -> Reward:
  """log P(caption satisfied) under the `shapes_reward` classifier (differentiable, <= 0)."""
  return _alignment_reward("shapes_alignment_log", "shapes_reward", scorer_dir, log=True)
