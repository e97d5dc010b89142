"""Pretrain the ShapesWorld text-to-image base model (CFG dropout): an eps-prediction
UNet on a DDPM schedule, or (config.model.family = "dit", config.schedule = "flow") a
rectified-flow DiT trained with the flow-matching loss.

Sections: mesh -> data -> model -> optimizer/state -> checkpoint/resume -> update step
-> evaluation -> loop -> export. Data is a pure function of (seed, step), the update
RNG is fold_in(seed, step), so a resumed run continues the exact same curve.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rft import checkpoint, image_grids, metrics, placement, pretrained
from rft.data import shapes
from rft.diffusion import flow, training
from rft.diffusion.pipeline import SamplerConfig, world_pipeline
from rft.models.dit import TextToImageDiT
from rft.models.t2i import TextToImage
from rft.train import loop
from rft.worlds import shapes_eval
from rft.train.state import TrainState, lr_schedule, make_optimizer

# The console line of an evaluation.
EVAL_LINE = (("reward", "reward", "f"), ("alignment", "alignment", "%"))


def build_model(model_cfg, vocab_size: int):
  """config.model -> TextToImage (family "unet", the default) or TextToImageDiT ("dit")."""
  text = dict(model_cfg.text)
  text.setdefault("vocab_size", vocab_size)
  family = model_cfg.get("family", "unet")
  if family == "unet":
    return TextToImage.from_config(text=text, unet=dict(model_cfg.unet))
  if family == "dit":
    return TextToImageDiT.from_config(text=text, dit=dict(model_cfg.dit))
  raise ValueError(f"config.model.family={family!r}; use 'unet' or 'dit'")


def schedule_meta(config) -> dict:
  """config.schedule as a bundle's meta["schedule"] (rft.diffusion.pipeline.world_pipeline)."""
  if config.schedule == "flow":
    return {"name": "flow", "num_train_timesteps": config.num_train_timesteps,
            "shift": float(config.get("flow_shift", 1.0))}
  return {"name": config.schedule, "num_train_timesteps": config.num_train_timesteps}


def model_meta(model, config) -> dict:
  """What load_base_model needs to rebuild the model and its sampler."""
  return {
      "model": dict({k: list(v) if isinstance(v, tuple) else v
                     for k, v in model.config().items()}, family=model.family),
      "schedule": schedule_meta(config),
      "sampler": dict(config.sampler),
      "holdout_fraction": config.holdout_fraction, "split_seed": config.split_seed,
  }


def load_judge(scorer_dir: str | None):
  """The evaluator (+ reward) judge, or None with a warning when the bundles are absent."""
  try:
    evaluator = shapes_eval.Scorer.load("shapes_evaluator", scorer_dir or None)
    reward = shapes_eval.Scorer.load("shapes_reward", scorer_dir or None)
  except FileNotFoundError as e:
    logging.warning("alignment evaluation disabled: %s", e)
    return None
  return shapes_eval.make_judge(evaluator, reward)


def denoising_loss(pipe, params, x0, tokens, key, cond_dropout, snr_gamma=None,
                   flow_weighting: str = "logit_normal", high_noise=None):
  """(loss, metrics) of the pretraining objective on clean images x0 for `tokens`: the eps
  loss (min-SNR weighted with snr_gamma; `high_noise` = (frac, start, x0_weight_cap), see
  training.eps_loss), or the flow-matching loss for a velocity model."""
  cond, null = pipe.conditions(params, tokens)
  if pipe.prediction == "velocity":
    return flow.flow_loss(pipe.model_fn, params, x0, cond, null, key, pipe.schedule,
                          cond_dropout, flow_weighting)
  frac, start, cap = high_noise or (0.0, 0.85, 0.0)
  return training.eps_loss(pipe.eps_fn, params, x0, cond, null, key, pipe.schedule,
                           cond_dropout, snr_gamma, frac, start, cap)


def high_noise_settings(config):
  """(frac, start, x0_weight_cap) of config.high_noise (all off when absent)."""
  h = config.get("high_noise", None)
  if not h:
    return None
  if not 0 <= h.frac <= 1 or not 0 <= h.start < 1 or h.x0_weight_cap < 0:
    raise ValueError(f"config.high_noise={dict(h)}: frac in [0, 1], start in [0, 1), "
                     "x0_weight_cap >= 0")
  return float(h.frac), float(h.start), float(h.x0_weight_cap)


def make_train_step(pipe, tx, config):
  """(state, batch, key) -> (state, metrics): render the batch's scenes, the eps loss (or
  the flow-matching loss for a velocity model), AdamW. The metrics hold the update's
  learning rate ("lr": the schedule at the update count state.step)."""
  lr = lr_schedule(config.lr, config.steps, config.warmup)  # make_optimizer's schedule

  def train_step(state, batch, step_key):
    x0 = shapes.render(batch["cells"], batch["offsets"])

    def loss_fn(p):
      return denoising_loss(pipe, p, x0, batch["tokens"], step_key, config.cond_dropout,
                            config.snr_gamma or None,
                            config.get("flow_weighting", "logit_normal"),
                            high_noise_settings(config))

    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    m["grad_norm"] = optax.global_norm(grads)
    m["lr"] = jnp.asarray(lr(state.step), jnp.float32)
    return state.apply_gradients(grads, tx, config.ema_decay), m

  return train_step


def train_and_evaluate(config, workdir: str):
  # ---------------------------------------------------------------- mesh and data
  # The RL loops' placement (config.mesh); the small model is replicated, batches split.
  place = placement.Placement.from_config(config, trained="replicate", frozen="replicate")
  mesh = place.mesh
  world = shapes.ShapesWorld(config.holdout_fraction, config.split_seed)
  tok = shapes.tokenizer()
  prompt_tokens = tok.encode(world.texts)  # [num_prompts, L]

  def host_batch(step: int) -> dict:
    rng = np.random.default_rng([config.seed, step])
    ids = world.sample_prompt_ids(rng, config.batch_size, "train")
    cells = world.sample_scenes(rng, ids)
    return {"cells": cells, "offsets": shapes.sample_offsets(rng, cells),
            "tokens": prompt_tokens[ids]}

  # ---------------------------------------------------------------- model and state
  model = build_model(config.model, tok.vocab_size)
  pipe = world_pipeline(model, schedule_meta(config), shapes.IMAGE_SIZE)
  tx = make_optimizer(config.lr, config.steps, config.warmup, config.weight_decay,
                      config.grad_clip)
  key = jax.random.key(config.seed)
  h = shapes.IMAGE_SIZE
  params = jax.jit(model.init)(key, jnp.zeros((1, h, h, 3)), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, tok.max_len), jnp.int32))["params"]
  if config.get("init_dir"):  # continue from an existing base bundle
    _, loaded, _ = pretrained.load_shapes_base(config.init_dir)
    want = jax.tree.map(jnp.shape, params)
    got = jax.tree.map(jnp.shape, loaded)
    if want != got:
      raise ValueError(f"config.init_dir={config.init_dir!r}: its model does not match "
                       "config.model (different parameter tree or shapes)")
    params = jax.tree.map(jnp.asarray, loaded)
  logging.info("model params: %d", sum(x.size for x in jax.tree.leaves(params)))
  state = place.create_state(lambda p: TrainState.create(p, tx, ema=config.ema_decay > 0),
                             params)

  # ---------------------------------------------------------------- checkpoint / resume
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
  # A mismatching checkpoint is a clear error, never a restart.
  start, state, _ = loop.resume(ckpt, state, workdir)

  # ---------------------------------------------------------------- update step
  train_step = jax.jit(make_train_step(pipe, tx, config), donate_argnums=(0,))

  # ---------------------------------------------------------------- evaluation
  writer = metrics.create_writer(workdir, resume_step=start)  # drops points after `start`
  sampler = SamplerConfig(**dict(config.sampler))
  judge = load_judge(config.scorer_dir)

  @jax.jit
  def sample_fn(p, tokens, k):
    return pipe.sample(p, tokens, k, sampler)[0].sample

  def evaluate(p, step: int, log: bool = True) -> dict:
    out = {}
    for split in ("train", "heldout"):
      ids = world.eval_prompt_ids(split, config.eval_prompts)
      fn = lambda chunk, k: sample_fn(p, jnp.asarray(prompt_tokens[chunk]), k)
      if judge is None:  # samples of the grid's prompts only
        ids = ids[image_grids.pick_samples(ids, world.family_ids[ids], image_grids.GRID_SAMPLES)]
        m, images, per = {}, np.asarray(fn(ids, jax.random.key(step))), None
      else:
        m, images, per = shapes_eval.evaluate_alignment(
            fn, judge, world, ids, jax.random.key(step), config.eval_samples_per_prompt,
            config.eval_batch_size, return_samples=True)
        ids = per["ids"]  # one per sample
      out.update({f"{split}/{k}": v for k, v in m.items()})
      if log:  # a fixed pick over the caption families, with reward and verdict
        shown = image_grids.pick_samples(ids, world.family_ids[ids], image_grids.GRID_SAMPLES)
        grid = image_grids.samples_grid(
            images[shown], [world.texts[i] for i in ids[shown]],
            None if per is None or per["reward"] is None else per["reward"][shown],
            None if per is None else per["aligned"][shown])
        writer.write_images(step, {f"samples/{split}": grid})
    if log:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
    return out

  # ---------------------------------------------------------------- loop
  if start == 0:  # the whole config; metric columns: final alignment and loss
    columns = [f"eval/{split}/{name}" for split in ("train", "heldout")
               for name in ("alignment", "reward")] if judge and config.eval_every else []
    writer.write_hparams(config, metrics=columns + ["train/loss"])
  bar = metrics.ProgressBar(config.steps, initial=start, desc="pretrain", unit="step")
  t0, results = time.time(), {}
  last_log = (start, time.time())  # (step, time) of the last logged metrics
  stop = loop.StopSignal()  # SIGTERM: end after this step with a checkpoint
  with placement.use_mesh(mesh):
    for step in range(start, config.steps):
      batch = place.batch(host_batch(step))
      state, m = train_step(state, batch, jax.random.fold_in(key, step))
      done = step + 1
      if done % config.log_every == 0 or done == config.steps:
        m = jax.device_get(m)
        loop.check_finite(float(m["loss"]), f"pretrain loss at step {done}", ckpt, workdir)
        now = time.time()
        m["steps_per_sec"] = (done - start) / (now - t0)
        # Throughput since the last logged step (the device_get above waited for it).
        m["samples_per_sec"] = config.batch_size * (done - last_log[0]) / (now - last_log[1])
        last_log = (done, now)
        writer.write_scalars(done, {f"train/{k}": v for k, v in m.items()})
        bar.update(done, loss=float(m["loss"]))
      if loop.due(done, config.eval_every, config.steps):  # before the checkpoint: its
        eval_params = state.ema_params if state.ema_params is not None else state.params
        results = evaluate(eval_params, done)  # points are then on disk with it
        logging.info("%s", loop.eval_line("step", done, results, EVAL_LINE))
      loop.end_of_step(stop, done, config.steps, config.ckpt_every,
                       lambda: ckpt.save(done, state), writer, workdir)
  stop.close()
  bar.close()
  ckpt.close()

  # ---------------------------------------------------------------- export
  final = jax.device_get(state.ema_params if state.ema_params is not None else state.params)
  if config.eval_every and not results:  # rerun of a finished run: re-measure, don't blank
    results = evaluate(final, config.steps, log=False)  # (its points are logged already)
  if jax.process_index() != 0:
    return results
  meta = model_meta(model, config)
  meta.update(command=pretrained.invocation(), steps=config.steps, results=results,
              train_seconds_this_run=round(time.time() - t0, 1))
  pretrained.export_bundle("shapes_base", final, meta, workdir, config.export_dir)
  writer.flush()
  return results


def load_or_pretrain_base(workdir: str, directory: str | None = None, config=None):
  """The ShapesWorld base model for finetuning: (model, params, meta).

  Uses the bundle in `directory` (rft.pretrained.resolve_dir: default the one shipped in
  rft/assets). When the shipped one is absent, pretrains one with `config` (default:
  configs/pretrain_shapes.py) in `workdir`/base_model, resuming there if a previous
  attempt was interrupted, and loads the result; any other folder without a bundle is an
  error (a mistyped --config.base_dir never starts a 20-minute pretraining).
  """
  if pretrained.exists("shapes_base", directory):
    return pretrained.load_shapes_base(directory)
  if pretrained.resolve_dir(directory) != pretrained.ASSETS:
    pretrained.load_meta("shapes_base", directory)  # raises, naming the missing files
  base_dir = f"{workdir}/base_model"
  logging.warning("no shipped base model in %s; pretraining one in %s (about 20 minutes on a "
                  "2-core CPU)", directory or pretrained.ASSETS, base_dir)
  if config is None:
    from rft import config as config_lib
    config = config_lib.load("pretrain_shapes")
  checkpoint.ensure_workdir(base_dir)
  train_and_evaluate(config, base_dir)
  return pretrained.load_shapes_base(base_dir)
