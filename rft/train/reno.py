"""ReNO on ShapesWorld: optimise each prompt's initial noise against the reward.

Sections: base model and sampler -> reward and judge -> the jitted ReNO batch ->
per split (train / held-out prompts) optimisation and judging -> logging and results.
No weights change: the base model is frozen, only the initial noise z of a few-step
deterministic DDIM sampler moves (rft.objectives.reno). Iteration 0 of ReNO scores
plain sampling from the initial noise, which is the baseline reported as "initial".

Reported per split: reward_{initial,best} (config.reward), alignment_{initial,best} (the
independent evaluator's hard check), p_caption_{initial,best} (the reward model's
P(caption), comparable across reward choices), reward_last_scored (the final scored
iterate: below reward_best when later iterates got worse), best_iter_mean, the mean
reward curve, reward_queries (prompts x iterations) and seconds (compile included in the
first split); overall reward_queries and wall_seconds, and a "history" of the form the
trainers write ({"0": plain sampling, "<iterations>": best iterate} with "<split>/alignment",
"<split>/reward", "<split>/p_caption" and the reward's parts). Written to results.json, as
scalars (TensorBoard) and as before/after image grids (also {split}_before_after.png).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rft import image_grids, metrics, paths, pretrained
from rft.data import shapes
from rft.diffusion.pipeline import world_pipeline
from rft.objectives import reno, trajectory
from rft.rewards import base as rewards_base
from rft.worlds import shapes_eval

_CURVES = ("rewards", "regs", "grad_norms")  # [iterations, B] outputs of reno.optimize


def run(config, workdir: str) -> dict:
  t_start = time.time()
  # ---------------------------------------------------------------- base model and sampler
  model, params, meta = pretrained.load_shapes_base(config.base_dir or None)
  pipe = world_pipeline(model, meta["schedule"], shapes.IMAGE_SIZE)
  clip_x0 = meta["sampler"].get("clip_x0")
  world = shapes.ShapesWorld(meta["holdout_fraction"], meta["split_seed"])
  prompt_tokens = shapes.tokenizer().encode(world.texts)

  # ---------------------------------------------------------------- reward and judge
  reward = rewards_base.build(config.reward, options=config.get("reward_options"),
                              scorer_dir=config.scorer_dir or None)
  if not reward.differentiable or reward.host:
    raise ValueError(f"ReNO needs a differentiable jax reward; config.reward={config.reward!r} "
                     f"gives differentiable={reward.differentiable}, host={reward.host}")
  # The independent evaluator's hard alignment, and the reward model's P(caption) so that
  # runs with different config.reward stay comparable.
  judge = shapes_eval.make_judge(
      shapes_eval.Scorer.load("shapes_evaluator", config.scorer_dir or None),
      shapes_eval.Scorer.load("shapes_reward", config.scorer_dir or None))

  # ---------------------------------------------------------------- the jitted ReNO batch
  tx = reno.make_optimizer(config.optimizer, config.lr, config.momentum, nesterov=True)
  guidance = float(config.guidance_scale)  # a Python 1.0 skips the unconditional pass
  unroll = trajectory.auto_unroll("auto")  # XLA:CPU: backward convs are slow in rolled loops

  @jax.jit
  def reno_batch(p, z0, ids, tokens, assignments):
    cond, null = pipe.conditions(p, tokens)

    def generate(z):
      return reno.ddim_generate(pipe.eps_fn, p, z, cond, null, schedule=pipe.schedule,
                                num_steps=config.num_steps, guidance_scale=guidance,
                                clip_x0=clip_x0, unroll=unroll)

    prompts = {"ids": ids, "tokens": tokens, "assignments": assignments}
    out = reno.optimize(z0, generate, reward, prompts, n_iters=config.iterations, tx=tx,
                        grad_clip=config.grad_clip or None, reg_weight=config.reg_weight)
    out["initial_parts"] = reward.parts(out["initial_images"], prompts)
    out["best_parts"] = reward.parts(out["images"], prompts)
    return out

  # ---------------------------------------------------------------- per split
  writer = metrics.create_writer(workdir)
  # The whole config; metric columns: the reward and alignment ReNO reached per split.
  writer.write_hparams(config, metrics=[f"{split}/{name}" for split in ("train", "heldout")
                                        for name in ("alignment_best", "reward_best")])
  key = jax.random.key(config.seed)
  bs = config.batch_size
  results = {}
  for s, split in enumerate(("train", "heldout")):
    t0 = time.time()
    ids = world.eval_prompt_ids(split, config.num_prompts)
    outs = []
    for b, start in enumerate(range(0, len(ids), bs)):
      chunk = ids[start:start + bs]
      chunk_p = np.concatenate([chunk, np.repeat(chunk[:1], bs - len(chunk))])  # one shape
      z0 = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, s), b),
                             (bs, *pipe.sample_shape), jnp.float32)
      assignments = world.assignments(chunk_p)
      out = reno_batch(params, z0, jnp.asarray(chunk_p), jnp.asarray(prompt_tokens[chunk_p]),
                       jnp.asarray(assignments))
      for when, images in (("initial", out["initial_images"]), ("best", out["images"])):
        j = judge(images, assignments)
        out[f"{when}_aligned"], out[f"{when}_p_caption"] = j["aligned"], j["reward"]
      out = jax.device_get(out)
      n = len(chunk)  # drop the padding: curves are [iterations, bs], the rest [bs, ...]
      outs.append({k: jax.tree.map(lambda x: x[:, :n] if k in _CURVES else x[:n], v)
                   for k, v in out.items()})
    cat = lambda k: np.concatenate([o[k] for o in outs], axis=1 if k in _CURVES else 0)
    curve = cat("rewards")  # [iterations, n_prompts]
    res = {
        "reward_initial": float(cat("initial_reward").mean()),
        "reward_best": float(cat("reward").mean()),
        "reward_last_scored": float(curve[-1].mean()),
        "alignment_initial": float(cat("initial_aligned").mean()),
        "alignment_best": float(cat("best_aligned").mean()),
        "p_caption_initial": float(cat("initial_p_caption").mean()),
        "p_caption_best": float(cat("best_p_caption").mean()),
        "best_iter_mean": float(cat("best_iter").mean()),
        "improved_fraction": float((cat("reward") > cat("initial_reward")).mean()),
        "reward_queries": int(len(ids) * config.iterations),
        "seconds": round(time.time() - t0, 1),
    }
    for name in outs[0]["best_parts"]:
      if name != reward.name or reward.terms:
        res[f"reward_initial/{name}"] = float(np.concatenate(
            [o["initial_parts"][name] for o in outs]).mean())
        res[f"reward_best/{name}"] = float(np.concatenate(
            [o["best_parts"][name] for o in outs]).mean())
    best_so_far = np.maximum.accumulate(curve, axis=0).mean(1)
    res["reward_curve"] = [round(float(v), 4) for v in curve.mean(1)]
    for i in range(config.iterations):
      writer.write_scalars(i, {f"{split}/reward": curve[i].mean(),
                               f"{split}/reward_best_so_far": best_so_far[i],
                               f"{split}/reg": cat("regs")[i].mean(),
                               f"{split}/grad_norm": cat("grad_norms")[i].mean()})
    writer.write_scalars(config.iterations, {f"{split}/{k}": v for k, v in res.items()
                                             if isinstance(v, float)})
    # Before (top row) / after (bottom row), prompts picked over the caption families,
    # each with its reward (config.reward) and the evaluator's verdict.
    shown = image_grids.pick_samples(ids, world.family_ids[ids], min(8, len(ids)))
    k = len(shown)
    grid = image_grids.samples_grid(
        np.concatenate([cat("initial_images")[shown], cat("images")[shown]]),
        [world.texts[i] for i in ids[shown]] * 2,
        np.concatenate([cat("initial_reward")[shown], cat("reward")[shown]]),
        np.concatenate([cat("initial_aligned")[shown], cat("best_aligned")[shown]]),
        ["before"] * k + ["after"] * k, ncols=k)
    writer.write_images(config.iterations, {f"samples/{split}/before_after": grid})
    image_grids.save_image(os.path.join(workdir, f"{split}_before_after.png"), grid)
    logging.info("ReNO %s: reward %.3f -> %.3f, alignment %.1f %% -> %.1f %% (%d prompts, "
                 "%.1f s)", split, res["reward_initial"], res["reward_best"],
                 100 * res["alignment_initial"], 100 * res["alignment_best"], len(ids),
                 res["seconds"])
    results[split] = res

  # ---------------------------------------------------------------- results
  results["reward_queries"] = sum(results[s]["reward_queries"] for s in ("train", "heldout"))
  # The same numbers as the trainers' evaluation history (rft.repro reads it): "0" is
  # plain sampling, the last iteration the best iterate per prompt.
  results["history"] = {}
  for it, when in ((0, "initial"), (config.iterations, "best")):
    h = results["history"][str(it)] = {}
    for s in ("train", "heldout"):
      for name in ("alignment", "reward", "p_caption"):
        h[f"{s}/{name}"] = results[s][f"{name}_{when}"]
      for k, v in results[s].items():  # the reward's parts: "reward_<when>/<part>"
        if k.startswith(f"reward_{when}/"):
          h[f"{s}/reward_{k.split('/', 1)[1]}"] = v
  results["wall_seconds"] = round(time.time() - t_start, 1)
  results["reward"] = rewards_base.parse_spec(config.reward)
  results["sampler"] = {"num_steps": config.num_steps, "eta": 0.0,
                        "guidance_scale": config.guidance_scale, "clip_x0": clip_x0}
  writer.flush()
  if jax.process_index() == 0:
    paths.write_json(os.path.join(workdir, "results.json"), results, indent=2, sort_keys=True)
  logging.info("ReNO done in %.1f s, %d reward queries", results["wall_seconds"],
               results["reward_queries"])
  return results
