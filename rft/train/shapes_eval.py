"""Prompt alignment of generated ShapesWorld images, judged by the pretrained scorers.

`alignment` is the fraction of samples whose predicted cells (evaluator argmax) satisfy
their caption; `reward` is the reward model's probability that the caption holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rft import pretrained
from rft.data import shapes
from rft.models import scorers
from rft.rewards import shapes_alignment as align


@dataclasses.dataclass
class Scorer:
  """A trained attribute classifier: apply(params, images) -> factored logits."""

  name: str
  module: Any
  params: Any

  @classmethod
  def load(cls, name: str, directory: str | None = None) -> "Scorer":
    meta = pretrained.load_meta(name, directory)
    module = scorers.make_scorer(meta["arch"])
    template = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    params, _ = pretrained.load_bundle(name, template, directory)
    return cls(name, module, params)

  def cell_log_probs(self, params, images):
    return align.joint_cell_log_probs(self.module.apply({"params": params}, images))


def make_judge(evaluator: Scorer, reward: Scorer | None = None) -> Callable:
  """judge(images [B,16,16,3], assignments [B,A,C,K]) -> {"aligned": [B], "reward": [B]}."""

  @jax.jit
  def judge(images, assignments):
    out = {"aligned": align.is_aligned(
        align.predicted_cells(evaluator.cell_log_probs(evaluator.params, images)), assignments)}
    if reward is not None:
      out["reward"] = jnp.exp(align.alignment_log_prob(
          reward.cell_log_probs(reward.params, images), assignments))
    return out

  return judge


def evaluate_alignment(sample_images: Callable, judge: Callable, world: shapes.ShapesWorld,
                       prompt_ids: np.ndarray, key, samples_per_prompt: int = 1,
                       batch_size: int = 256) -> tuple[dict, np.ndarray]:
  """Sample images for prompt_ids (x samples_per_prompt) and judge them.

  sample_images(prompt_ids, key) -> images [n,16,16,3]. Returns (metrics, first images).
  Metrics: alignment, reward (if the judge has a reward model), and alignment per family.
  """
  ids = np.repeat(np.asarray(prompt_ids), samples_per_prompt)
  aligned, reward, first = [], [], None
  for i, start in enumerate(range(0, len(ids), batch_size)):
    chunk = ids[start:start + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    chunk_p = np.concatenate([chunk, np.repeat(chunk[:1], pad)])
    images = sample_images(chunk_p, jax.random.fold_in(key, i))
    out = jax.device_get(judge(images, world.assignments(chunk_p)))
    aligned.append(np.asarray(out["aligned"])[:len(chunk)])
    if "reward" in out:
      reward.append(np.asarray(out["reward"])[:len(chunk)])
    if first is None:
      first = np.asarray(images)[:len(chunk)]
  aligned = np.concatenate(aligned)
  m = {"alignment": float(aligned.mean())}
  if reward:
    m["reward"] = float(np.concatenate(reward).mean())
  fams = world.family_ids[ids]
  for f, name in enumerate(shapes.FAMILIES):
    if np.any(fams == f):
      m[f"alignment_{name}"] = float(aligned[fams == f].mean())
  return m, first
