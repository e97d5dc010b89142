"""Train the ShapesWorld attribute classifiers on rendered images (never generated ones).

Two scorers, independent in seed, architecture and data stream:
  reward    -- differentiable alignment reward model (rft.models.scorers.CellCNN)
  evaluator -- the independent judge of prompt alignment (CropCNN)
Loss: cross-entropy on occupancy per cell plus colour/shape/size on occupied cells.
Images are augmented (noise, blur, contrast, colour gain) so that the scorers stay
reliable on the softer, noisier images a diffusion model generates.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rft import checkpoint, metrics, placement, pretrained
from rft.data import shapes
from rft.models import scorers as scorer_models
from rft.rewards import shapes_alignment as align
from rft.train.state import TrainState, make_optimizer


def augment(key, x, noise: float = 0.2):
  """Random blur mix, contrast/brightness, per-channel gain and Gaussian noise."""
  b = x.shape[0]
  k = jax.random.split(key, 6)
  u = lambda kk, lo, hi, shape=(b, 1, 1, 1): jax.random.uniform(kk, shape, minval=lo, maxval=hi)
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  blur = sum(pad[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
  alpha = u(k[0], 0.0, 1.0) * (jax.random.uniform(k[1], (b, 1, 1, 1)) < 0.4)
  x = (1 - alpha) * x + alpha * blur
  x = x * u(k[2], 0.8, 1.1) + u(k[3], -0.1, 0.1)
  x = x * u(k[4], 0.9, 1.1, (b, 1, 1, 3))
  sigma = u(k[5], 0.0, noise)
  return x + sigma * jax.random.normal(jax.random.fold_in(key, 7), x.shape)


def scorer_loss(logits, cells):
  occ = cells > 0
  kk = jnp.maximum(cells - 1, 0)
  color = kk // (len(shapes.SHAPES) * len(shapes.SIZES))
  shape = (kk // len(shapes.SIZES)) % len(shapes.SHAPES)
  size = kk % len(shapes.SIZES)
  ce = optax.softmax_cross_entropy_with_integer_labels
  attr = ce(logits["color"], color) + ce(logits["shape"], shape) + ce(logits["size"], size)
  loss = ce(logits["occupied"], occ.astype(jnp.int32)).mean() + (attr * occ).sum() / jnp.maximum(
      occ.sum(), 1)
  pred = align.predicted_cells(align.joint_cell_log_probs(logits))
  return loss, {"loss": loss, "cell_acc": (pred == cells).mean()}


def evaluate_scorer(apply_fn, params, world: shapes.ShapesWorld, n: int, seed: int,
                    noise: float = 0.0, batch: int = 512) -> dict:
  """Accuracy on freshly rendered images of held-out prompts (seed unseen in training).

  cell_acc: per-cell class accuracy; scene_acc: all four cells right; alignment: the
  fraction of renders judged to satisfy their own caption (truth: all of them).
  """
  rng = np.random.default_rng(seed)
  hits = {"cell_acc": [], "scene_acc": [], "alignment": []}
  for start in range(0, n, batch):
    m = min(batch, n - start)
    ids = world.sample_prompt_ids(rng, m, "heldout")
    cells = world.sample_scenes(rng, ids)
    x = shapes.render_np(cells, rng)
    if noise:
      x = x + noise * rng.standard_normal(x.shape).astype(np.float32)
    pred = np.asarray(align.predicted_cells(align.joint_cell_log_probs(apply_fn(params, x))))
    ok = np.asarray(align.is_aligned(jnp.asarray(pred), jnp.asarray(world.assignments(ids))))
    hits["cell_acc"].append((pred == cells).mean(1))
    hits["scene_acc"].append((pred == cells).all(1))
    hits["alignment"].append(ok)
  return {k: float(np.concatenate(v).mean()) for k, v in hits.items()}


def _train_one(name: str, cfg, config, world, place, workdir, writer) -> tuple[dict, dict]:
  model = scorer_models.make_scorer(cfg.arch)
  tx = make_optimizer(config.lr, config.steps, config.warmup, config.weight_decay)
  key = jax.random.key(cfg.seed)
  params = model.init(key, jnp.zeros((1, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)))["params"]
  state = place.create_state(lambda p: TrainState.create(p, tx), params)
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints_{name}", max_to_keep=1)
  start = 0
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state)
    start = int(state.step)
    logging.info("%s: resumed from step %d", name, start)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, cells, offsets, key):
    x = augment(key, shapes.render(cells, offsets), config.aug_noise)
    def loss_fn(p):
      return scorer_loss(model.apply({"params": p}, x), cells)
    grads, m = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, tx), m

  bar = metrics.ProgressBar(config.steps, initial=start, desc=name, unit="step")
  with placement.use_mesh(place.mesh):
    for step in range(start, config.steps):
      rng = np.random.default_rng([cfg.seed, step])
      half = config.batch_size // 2
      ids = world.sample_prompt_ids(rng, config.batch_size - half, "train")
      cells = np.concatenate([shapes.random_scenes(rng, half), world.sample_scenes(rng, ids)])
      offsets = shapes.sample_offsets(rng, cells)
      batch = place.batch({"cells": cells, "offsets": offsets})
      state, m = train_step(state, batch["cells"], batch["offsets"],
                            jax.random.fold_in(key, step))
      if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
        m = jax.device_get(m)
        writer.write_scalars(step + 1, {f"{name}/{k}": v for k, v in m.items()})
        bar.update(step + 1, loss=float(m["loss"]), acc=float(m["cell_acc"]))
      if (step + 1) % config.ckpt_every == 0 or step + 1 == config.steps:
        ckpt.save(step + 1, state)
  bar.close()
  ckpt.close()
  apply_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  clean = evaluate_scorer(apply_fn, state.params, world, config.eval_images, seed=10_000 + cfg.seed)
  noisy = evaluate_scorer(apply_fn, state.params, world, config.eval_images, seed=20_000 + cfg.seed,
                          noise=0.1)
  results = {**{f"heldout_{k}": v for k, v in clean.items()},
             **{f"heldout_noise0.1_{k}": v for k, v in noisy.items()}}
  writer.write_scalars(config.steps, {f"{name}/eval/{k}": v for k, v in results.items()})
  logging.info("%s scorer on held-out renders: cell accuracy %.1f %%, scene %.1f %%, "
               "alignment %.1f %% (noise 0.1: %.1f %%, %.1f %%, %.1f %%)", name,
               *(100 * results[f"heldout_{p}{k}"] for p in ("", "noise0.1_")
                 for k in ("cell_acc", "scene_acc", "alignment")))
  return jax.device_get(state.params), results


def train_and_evaluate(config, workdir: str):
  """Train the reward scorer and the evaluator; export both as pretrained bundles."""
  # The RL loops' placement (config.mesh); the small scorers are replicated.
  place = placement.Placement.from_config(config, trained="replicate", frozen="replicate")
  world = shapes.ShapesWorld(config.holdout_fraction, config.split_seed)
  writer = metrics.create_writer(workdir)
  # The whole config; metric columns: each scorer's held-out accuracy and alignment.
  writer.write_hparams(config, metrics=[f"{name}/eval/heldout_{k}"
                                        for name in ("reward", "evaluator")
                                        for k in ("scene_acc", "alignment")])
  summary = {}
  for name in ("reward", "evaluator"):
    cfg = config[name]
    t0 = time.time()
    params, results = _train_one(name, cfg, config, world, place, workdir, writer)
    results["train_seconds_this_run"] = round(time.time() - t0, 1)
    meta = {"arch": cfg.arch, "seed": cfg.seed, "steps": config.steps,
            "results": results, "command": pretrained.invocation()}
    pretrained.save_bundle(f"shapes_{name}", params, meta, workdir)
    if config.export_dir:
      pretrained.save_bundle(f"shapes_{name}", params, meta, config.export_dir)
    summary[name] = results
  writer.flush()
  return summary
