"""Prompt alignment of generated ShapesWorld images, judged by the pretrained scorers.

`alignment` is the fraction of samples whose predicted cells (evaluator argmax) satisfy
their caption; `reward` is the reward model's probability that the caption holds.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rft import pretrained
from rft.data import shapes
from rft.rewards import shapes_alignment as align
from rft.rewards.shapes_alignment import Scorer  # noqa: F401  (re-exported)


def make_judge(evaluator: Scorer, reward: Scorer | None = None) -> Callable:
  """judge(images [B,16,16,3], assignments [B,A,C,K]) -> {"aligned": [B], "reward": [B]}."""

  @jax.jit
  def judge(images, assignments):
    cells = align.predicted_cells(evaluator.cell_log_probs(evaluator.params, images))
    out = {"aligned": align.is_aligned(cells, assignments), "cells": cells}
    if reward is not None:
      out["reward"] = jnp.exp(align.alignment_log_prob(
          reward.cell_log_probs(reward.params, images), assignments))
    return out

  return judge


def evaluate_alignment(sample_images: Callable, judge: Callable, world: shapes.ShapesWorld,
                       prompt_ids: np.ndarray, key, samples_per_prompt: int = 1,
                       batch_size: int = 256, return_samples: bool = False) -> tuple:
  """Sample images for prompt_ids (x samples_per_prompt) and judge them.

  sample_images(prompt_ids, key) -> images [n,16,16,3]. Returns (metrics, the images of
  the first batch), or with `return_samples` (metrics, every image [N,16,16,3], per
  sample {"ids": [N] (prompt_ids, each repeated samples_per_prompt times), "aligned":
  bool [N], "reward": [N] or None}).
  Metrics: alignment, reward (if the judge has a reward model), alignment per family,
  and objects_present: every named (colour, shape) object is there, as often as named,
  ignoring sizes, positions, relations and extra objects (a looser, diagnostic score).
  """
  ids = np.repeat(np.asarray(prompt_ids), samples_per_prompt)
  aligned, reward, present, first, every = [], [], [], None, []
  for i, start in enumerate(range(0, len(ids), batch_size)):
    chunk = ids[start:start + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    chunk_p = np.concatenate([chunk, np.repeat(chunk[:1], pad)])
    images = sample_images(chunk_p, jax.random.fold_in(key, i))
    out = jax.device_get(judge(images, world.assignments(chunk_p)))
    aligned.append(np.asarray(out["aligned"])[:len(chunk)])
    present.append([objects_present(world.prompts[i], c)
                    for i, c in zip(chunk, np.asarray(out["cells"]))])
    if "reward" in out:
      reward.append(np.asarray(out["reward"])[:len(chunk)])
    if first is None:
      first = np.asarray(images)[:len(chunk)]
    if return_samples:
      every.append(np.asarray(images)[:len(chunk)])
  aligned = np.concatenate(aligned)
  m = {"alignment": float(aligned.mean()), "objects_present": float(np.mean(np.concatenate(present)))}
  if reward:
    m["reward"] = float(np.concatenate(reward).mean())
  fams = world.family_ids[ids]
  for f, name in enumerate(shapes.FAMILIES):
    if np.any(fams == f):
      m[f"alignment_{name}"] = float(aligned[fams == f].mean())
  if return_samples:
    return m, np.concatenate(every), {"ids": ids, "aligned": aligned,
                                      "reward": np.concatenate(reward) if reward else None}
  return m, first


def objects_present(prompt: shapes.Prompt, cells: np.ndarray) -> bool:
  """Does the scene hold every (colour, shape) the prompt names, as many times as named?"""
  found: dict[tuple[int, int], int] = {}
  for k in cells:
    if k > 0:
      col, sh, _ = shapes.class_attributes(int(k))
      found[(col, sh)] = found.get((col, sh), 0) + 1
  need: dict[tuple[int, int], int] = {}
  for o in prompt.objects:
    need[(o.color, o.shape)] = need.get((o.color, o.shape), 0) + prompt.count
  return all(found.get(k, 0) >= n for k, n in need.items())


def sweep_samplers(samplers: list[str], base_dir: str | None = None, prompts: int = 256,
                   seed: int = 0, unet_noise: float = 0.0) -> dict:
  """Alignment of the base model per sampler setting "steps,eta,cfg" on both splits.

  unet_noise > 0 first adds N(0, unet_noise^2) to every UNet weight (numpy seed 0): how
  far the weights can wander before the samples degrade.
  """
  import time

  from rft.diffusion.pipeline import SamplerConfig, world_pipeline

  model, params, meta = pretrained.load_shapes_base(base_dir)
  if unet_noise:
    rng = np.random.RandomState(0)
    params = dict(params, unet=jax.tree.map(
        lambda x: x + np.float32(unet_noise) * rng.randn(*x.shape).astype(np.float32),
        params["unet"]))
  pipe = world_pipeline(model, meta["schedule"])
  world = shapes.ShapesWorld(meta["holdout_fraction"], meta["split_seed"])
  tokens = shapes.tokenizer().encode(world.texts)
  judge = make_judge(Scorer.load("shapes_evaluator"), Scorer.load("shapes_reward"))
  results = {}
  for spec in samplers:
    steps, eta, cfg_scale = spec.split(",")
    cfg = SamplerConfig(int(steps), float(eta), float(cfg_scale), meta["sampler"]["clip_x0"],
                        meta["sampler"].get("name", "ddim"))
    sample = jax.jit(lambda p, t, k, cfg=cfg: pipe.sample(p, t, k, cfg)[0].sample)
    fn = lambda ids, key, sample=sample: sample(params, jnp.asarray(tokens[ids]), key)
    t0, out = time.time(), {}
    for split in ("train", "heldout"):
      m, _ = evaluate_alignment(fn, judge, world, world.eval_prompt_ids(split, prompts),
                                jax.random.key(seed), batch_size=min(256, prompts))
      out[split] = {k: round(v, 3) for k, v in m.items()}
    out["seconds"] = round(time.time() - t0, 1)
    print(spec, f"unet_noise={unet_noise}" if unet_noise else "", out, flush=True)
    results[spec] = out
  return results


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description="Evaluator alignment of the ShapesWorld base model "
                               "for sampler settings (steps,eta,cfg).")
  ap.add_argument("samplers", nargs="+", help='e.g. 20,1,1.5 10,1,1.5 20,0,3')
  ap.add_argument("--base_dir", default=None, help="bundle folder (default: rft/assets)")
  ap.add_argument("--prompts", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--unet_noise", default="0", help="comma-separated std(s) of Gaussian noise "
                  "added to the UNet weights, e.g. 0,1e-3,3e-3")
  a = ap.parse_args()
  for std in a.unet_noise.split(","):
    sweep_samplers(a.samplers, a.base_dir, a.prompts, a.seed, float(std))
