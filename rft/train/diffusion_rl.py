"""The diffusion reward-finetuning loop (trainer `diffusion_rl`): PRDP, DDPO, DRaFT,
AlignProp, RAFT and any objective registered in rft.objectives.registry.

    prompts -> rollout(theta_old) -> reward -> prepare -> K x update(state, batch)

Sections: world and base model -> reward and judge -> trainable params (full or LoRA)
-> objective (its record, prepare + jitted update of its kind) -> checkpoint / resume ->
evaluation -> one epoch per kind -> loop. The loop dispatches on the objective's kind
(trajectory, reward_backprop, select_sft) and the needs its record declares, never on
its name. Prompts, noise and update keys are functions of (seed, epoch), and the
checkpoint holds the train state (params, optimizer, step) and the objective's
statistics (e.g. DDPO's per-prompt reward buffers), written at epoch ends where
theta_old == theta, so a resumed run continues the same curve bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from flax.core import unfreeze

from rft import checkpoint, image_grids, metrics
from rft import config as config_lib
from rft.placement import Placement
from rft.diffusion import sampling
from rft.diffusion.sampling import SamplerConfig
from rft.models import lora
from rft.objectives import registry, step_baselines, trajectory
from rft.rewards import base as rewards_lib
from rft.train import loop
from rft.worlds import diffusion_worlds
from rft.train.batching import group_rows, minibatches
from rft.train.diffusion_updates import (make_backprop_update, make_sft_update,
                                         make_trajectory_update, sampler_kwargs, total_updates)
from rft.train.state import TrainState, make_optimizer

# Per-epoch training metrics kept for results.json["curve"] (learning curves, stability).
CURVE_KEYS = ("reward_mean", "kl_to_ref", "loss", "grad_norm", "clip_frac", "epoch_seconds",
              # where a trajectory epoch's time goes (each phase waits for its results)
              "seconds_rollout", "seconds_reward", "seconds_step_values",
              "seconds_ref_log_probs", "seconds_update")
# The console line of an evaluation (rft.train.loop.eval_line).
EVAL_LINE = (("reward", "config_reward", "f"), ("alignment", "alignment", "%"))



# ------------------------------------------------------------------------ trainable params


def trainable_mask(params, pattern: str):
  """Bool tree: which leaves of a full-finetuning tree are trained (regex on 'a/b/c' paths)."""
  rx = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: bool(rx.search("/".join(str(getattr(k, "key", k)) for k in path))), params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"config.finetune.trainable={pattern!r} matches no parameter")
  return mask


def setup_finetuning(config, base_params, key):
  """(trainable tree, materialize(trainable, base) -> full params, optimizer).

  The base params always enter jitted code as an argument, never as a closure constant:
  XLA folds constants with different rounding, which would break ratio == 1 on-policy.
  """
  ft = config.finetune
  tx = make_optimizer(config.lr, total_updates(config), config.warmup, config.weight_decay, config.grad_clip,
                      config.adam_b1, config.adam_b2, schedule="constant",
                      eps=config.get("adam_eps", 1e-8), name=config.get("optimizer", "adamw"))
  if ft.mode == "lora":
    trainable = lora.init(base_params, key, ft.lora_rank, ft.lora_targets)

    def materialize(tr, base):
      return lora.merge(base, tr, ft.lora_alpha, ft.lora_rank)

    return trainable, materialize, tx
  if ft.mode != "full":
    raise ValueError(f"config.finetune.mode={ft.mode!r}; use 'full' or 'lora'")
  mask = trainable_mask(base_params, ft.trainable)
  # Only the selected leaves are trained (and differentiated: with the text encoder or
  # the UNet's high-resolution blocks frozen, backward passes stop where they start).
  return jax.tree.map(jnp.copy, select_leaves(base_params, mask)), overlay, tx


def select_leaves(params, mask):
  """The nested dict of the leaves of `params` where `mask` is True (empty parts dropped)."""
  flat = traverse_util.flatten_dict(unfreeze(params))
  keep = traverse_util.flatten_dict(unfreeze(mask))
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep[k]})


def overlay(trained, base):
  """`base` with the leaves of `trained` (a subset of its paths) put in their place."""
  flat = traverse_util.flatten_dict(unfreeze(base))
  for k, v in traverse_util.flatten_dict(unfreeze(trained)).items():
    if k not in flat:
      raise KeyError(f"trained param {'/'.join(map(str, k))} is not in the model")
    flat[k] = v
  return traverse_util.unflatten_dict(flat)



# ------------------------------------------------------------------------ helpers


@jax.jit
def soft_update(old, new, decay):
  """d · old + (1 − d) · new, leaf by leaf (a lagged policy's update)."""
  return jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, old, new)


def reward_eval_metrics(reward, rewards, images, prompts, params, judged: bool) -> dict:
  """The configured reward's mean on evaluated images ("config_reward") and the mean of
  each of its terms or parts (a weighted sum's terms, an ensemble's members and their
  mean/std, a shaped reward's value before shaping): "reward_<part>" where no evaluator
  judges the images, "config_reward_<part>" beside the evaluator's metrics. A single
  plain reward beside an evaluator adds nothing (its value is config_reward)."""
  m = {"config_reward": float(np.mean(rewards))}
  if not judged or reward.terms or reward.parts_fn is not None:
    parts = reward.parts(images if reward.host else jnp.asarray(images), prompts, params)
    prefix = "config_reward_" if judged else "reward_"
    m.update({f"{prefix}{k}": float(np.mean(np.asarray(v))) for k, v in parts.items()})
  return m


def _sample_all(sample_images, ids, key, batch_size: int) -> np.ndarray:
  """Images for every id, in chunks of batch_size (the last one padded: one compiled shape)."""
  out = []
  for i, start in enumerate(range(0, len(ids), batch_size)):
    chunk = ids[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])
    out.append(np.asarray(sample_images(padded, jax.random.fold_in(key, i)))[:len(chunk)])
  return np.concatenate(out)


def group_stats(rewards: np.ndarray, group_size: int) -> dict:
  g = np.asarray(rewards, np.float32).reshape(-1, group_size)
  std = g.std(axis=1)
  return {"reward_mean": float(g.mean()), "reward_std": float(g.std()),
          "reward_std_within_prompt": float(std.mean()),
          "zero_std_groups": float(np.mean(std < 1e-6))}


def _take(placement: Placement, batch: dict, idx: np.ndarray, per_sample: tuple) -> dict:
  """Rows `idx` of the per-sample entries of `batch` (split over the mesh's data axes);
  the other entries (shared timesteps, the null condition) as they are."""
  taken = placement.take_rows({k: v for k, v in batch.items() if k in per_sample}, idx)
  return {k: taken.get(k, v) for k, v in batch.items()}


def rows_per_prompt(config, obj: registry.DiffusionObjective) -> tuple[int, str]:
  """Rows each prompt adds to an update batch, and the config key(s) they come from."""
  if obj.rows_per_prompt is not None:
    return obj.rows_per_prompt(config)
  if obj.kind == "reward_backprop":
    return 1, ""
  return config.samples_per_prompt, "config.samples_per_prompt"


def check_rows(config, placement: Placement) -> None:
  """Every batch the loop builds splits evenly over the mesh's data-parallel devices."""
  obj = registry.diffusion(config.objective.name)
  rows, key = rows_per_prompt(config, obj)
  placement.check_rows(config.prompts_per_update * rows,
                       "config.prompts_per_update" + (f" * {key}" if key else ""))
  if obj.kind != "reward_backprop":
    placement.check_rows(config.prompts_per_epoch * config.samples_per_prompt,
                         "config.prompts_per_epoch * config.samples_per_prompt")


def validate(config) -> registry.DiffusionObjective:
  """The objective's record, after the checks of its kind, its needs and its own."""
  config_lib.check_required(config)  # e.g. a flow objective's base_dir
  o = config.objective
  obj = registry.diffusion(o.name)  # an unknown name lists the registered ones
  if config.sampler.get("name", "ddim") not in sampling.SAMPLERS:
    raise ValueError(f"config.sampler.name={config.sampler.name!r} is not a registered "
                     f"sampler; known: {sorted(sampling.SAMPLERS)}")
  if config.prompts_per_epoch % config.prompts_per_update:
    raise ValueError(f"config.prompts_per_epoch={config.prompts_per_epoch} must be a multiple "
                     f"of config.prompts_per_update={config.prompts_per_update}")
  if obj.needs_groups and config.samples_per_prompt < 2:
    raise ValueError(f"{o.name} needs config.samples_per_prompt >= 2 (pairs or groups of the "
                     f"same prompt), got {config.samples_per_prompt}")
  if obj.kind == "trajectory":
    step_baselines.check_kind(o.get("step_baseline", "none"))
  elif o.get("step_baseline", "none") != "none":
    raise ValueError(f"config.objective.step_baseline={o.step_baseline!r}: per-step baselines "
                     f"apply to trajectory objectives "
                     f"({[n for n in registry.diffusion_names() if registry.diffusion(n).kind == 'trajectory']}), "
                     f"not {o.name!r}")
  if config.get("share_initial_noise") and (obj.kind == "reward_backprop"
                                            or config.samples_per_prompt < 2):
    raise ValueError("config.share_initial_noise=True needs groups: several samples per prompt "
                     f"(config.samples_per_prompt={config.samples_per_prompt}, objective "
                     f"{o.name!r})")
  window = config.get("sde_window", {}).get("size", 0)
  if window:
    w = config.sde_window
    if obj.kind != "trajectory":
      raise ValueError(f"config.sde_window.size={window}: a mixed ODE-SDE rollout is for "
                       f"trajectory objectives, not {o.name!r} ({obj.kind})")
    if not 1 <= window <= config.sampler.num_steps:
      raise ValueError(f"config.sde_window.size={window} must be in [1, "
                       f"config.sampler.num_steps={config.sampler.num_steps}]")
    if w.stride < 1 or w.every < 1:
      raise ValueError(f"config.sde_window.stride={w.stride} and .every={w.every} must be >= 1")
    if o.get("timestep_fraction", 1.0) != 1.0 or o.get("skip_last_steps", 0):
      raise ValueError("config.sde_window trains exactly its window's steps: leave "
                       "config.objective.timestep_fraction at 1 and skip_last_steps at 0 "
                       f"(got {o.get('timestep_fraction')}, {o.get('skip_last_steps')})")
  if obj.kind == "trajectory" and config.sampler.eta <= 0:
    raise ValueError(f"{o.name} needs a stochastic sampler: config.sampler.eta must be > 0 "
                     f"(log-probs are undefined at eta=0), got {config.sampler.eta}")
  if obj.check is not None:
    obj.check(config)
  return obj


def evaluation_sampler(config, sampler: SamplerConfig) -> SamplerConfig:
  """The sampler of the evaluation samples: the rollout's, with config.eval_sampler's
  eta, guidance_scale and num_steps where they are >= 0 (eta 0: the deterministic ODE /
  DDIM)."""
  kinds = {"eta": float, "guidance_scale": float, "num_steps": int}
  given = dict(config.get("eval_sampler", {}))
  unknown = set(given) - set(kinds)
  if unknown:
    raise ValueError(f"config.eval_sampler sets {sorted(unknown)}; it holds "
                     f"{', '.join(kinds)} (negative: the rollout sampler's)")
  over = {k: kinds[k](v) for k, v in given.items() if v >= 0}
  if over.get("num_steps") == 0:
    raise ValueError("config.eval_sampler.num_steps=0: give a step count >= 1, or -1 for "
                     "the rollout sampler's")
  return dataclasses.replace(sampler, **over)


# ------------------------------------------------------------------------ main


def train_and_evaluate(config, workdir: str):
  obj = validate(config)
  o = config.objective
  t_start = time.time()
  # ---------------------------------------------------------------- world and base model
  placement = Placement.from_config(config)  # config.mesh, config.sharding
  check_rows(config, placement)
  world = diffusion_worlds.build(config, workdir)
  pipe, tokens_all = world.pipe, world.tokens
  base_params = placement.put_frozen(world.base_params)
  sampler = SamplerConfig(**dict(config.sampler))
  step_sampler = pipe.sampler(sampler)  # the registered sampler (config.sampler.name)
  eval_sampler = evaluation_sampler(config, sampler)
  B = config.samples_per_prompt
  # ---------------------------------------------------------------- reward
  reward = rewards_lib.build(config.reward, options=config.get("reward_options"),
                             **world.reward_kwargs)
  if obj.differentiable_reward and not reward.differentiable:
    raise ValueError(f"{o.name} backpropagates through the reward, but config.reward "
                     f"{config.reward!r} is not differentiable")
  reward_params = placement.put_reward(reward.params)
  reward_jit = None if reward.host else jax.jit(
      lambda images, prompts, params: reward(images, prompts, params))
  to_images = jax.jit(pipe.images)  # decoded with the frozen base params (e.g. the VAE)

  def score(images, ids) -> np.ndarray:
    """Rewards of every sample, as numpy on every process (non-finite ones stop the run,
    naming config.reward)."""
    out = _score(images, ids)
    rewards_lib.check_finite_rewards(out, config.reward)
    return out

  def _score(images, ids) -> np.ndarray:
    prompts = world.reward_prompts(ids)
    if reward.host:  # each process scores the rows it holds
      local = placement.local_rows(images)
      if len(local) == len(ids):
        return np.asarray(reward(local, prompts), np.float32)
      rows = placement.rows(len(ids))
      mine = np.asarray(reward(local, jax.tree.map(lambda a: np.asarray(a)[rows], prompts)),
                        np.float32)
      return placement.gather_rows(mine)
    images = placement.batch(images, strict=False)
    prompts = placement.batch(prompts, size=len(ids), strict=False)
    return placement.gather(reward_jit(images, prompts, reward_params)).astype(np.float32)

  # ---------------------------------------------------------------- trainable params
  key = jax.random.key(config.seed)
  trainable, materialize, tx = setup_finetuning(config, base_params, jax.random.fold_in(key, 2**31 - 1))
  # Created already sharded (config.sharding.trained; Adam moments and EMA follow).
  state = placement.create_state(
      lambda p: TrainState.create(p, tx, ema=config.ema_decay > 0), trainable)
  del trainable
  # The trained params' norm before training (before any resume): loop.check_diverged.
  start_norm = loop.params_norm(state.params)
  # The objective's host-side statistics (e.g. DDPO's per-prompt reward buffers), kept
  # in the checkpoint.
  stats = obj.make_stats(config, len(world.texts)) if obj.make_stats else None
  logging.info("objective %s, finetune %s: %d trainable params", o.name, config.finetune.mode,
               sum(x.size for x in jax.tree.leaves(state.params)))

  # ---------------------------------------------------------------- checkpoint / resume
  # A lagged sampling policy (DiffusionNFT's θ_old): its own copy of the trainable leaves,
  # laid out like them, moved toward θ after every epoch and kept in the checkpoint.
  lagged = obj.sampling_decay is not None
  sampling_params = jax.tree.map(jnp.copy, state.params) if lagged else None

  def ckpt_tree(st):
    tree = {"state": st, "tracker": stats.state() if stats else {}}
    if lagged:
      tree["sampling_params"] = sampling_params
    return tree

  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
  # history: evaluations by epoch; curve: per-epoch training metrics; seconds_before: wall
  # time of earlier runs of this workdir (all three kept in the checkpoint's metadata).
  start_epoch, restored, ck_meta = loop.resume(ckpt, ckpt_tree(state), workdir, "epoch")
  state = restored["state"]
  if lagged:
    sampling_params = restored["sampling_params"]
  if stats and start_epoch:
    stats.load_state(restored["tracker"])
  history, curve = ck_meta.get("history", {}), ck_meta.get("curve", {})
  seconds_before = float(ck_meta.get("seconds", 0.0))

  # ---------------------------------------------------------------- rollout and updates
  step_baseline = o.get("step_baseline", "none")
  share_within = B if config.get("share_initial_noise") else 1

  @functools.partial(jax.jit, static_argnames=("share", "record_x0", "with_ref"))
  def rollout(trainable, base, tokens, key, share=1, record_x0=False, sde_steps=None,
              with_ref=False):
    # with_ref: the base's log-prob of every sampled transition, in the same loop (XLA may
    # compute the frozen layers policy and base share once per step; sampling.rollout).
    traj, cond, null = pipe.sample(materialize(trainable, base), tokens, key, sampler,
                                   share_within=share, record_x0=record_x0,
                                   sde_steps=sde_steps, ref_params=base if with_ref else None)
    return traj, cond, null

  @jax.jit
  def eval_rollout(trainable, base, tokens, key):
    return pipe.sample(materialize(trainable, base), tokens, key, eval_sampler)[0]

  window = config.get("sde_window", {}).get("size", 0)

  def sde_window(epoch):
    """(bool [T] stochastic steps, int [size] their indices) of this epoch's MixGRPO
    window, or (None, None) when every step is stochastic."""
    if not window:
      return None, None
    w = config.sde_window
    start = trajectory.sde_window_start(epoch, sampler.num_steps, window, w.stride, w.every,
                                        w.roll_back)
    steps = np.arange(start, start + window, dtype=np.int32)
    return np.isin(np.arange(sampler.num_steps), steps), steps

  @jax.jit
  def ref_log_probs(base, traj, cond, null):
    return sampling.trajectory_log_probs(pipe.model_fn, base, step_sampler, traj, cond, null,
                                         guidance_scale=sampler.guidance_scale)

  @jax.jit
  def conditions(base, tokens):
    return pipe.conditions(base, tokens)  # the text encoder is frozen

  if obj.kind == "trajectory":
    scorer = trajectory.StepScorer(pipe.model_fn, step_sampler, sampler.guidance_scale,
                                   reduce="mean")
    update = make_trajectory_update(config, scorer, obj.make_loss(config), materialize, tx,
                                    placement, state, base_params)
  elif obj.kind == "reward_backprop":
    update = make_backprop_update(config, pipe, sampler, reward,
                                  obj.make_loss(config, sampler_kwargs(step_sampler, sampler)),
                                  materialize, tx, placement, state, base_params)
  else:
    update = make_sft_update(config, obj.make_loss(config, pipe), materialize, tx, placement,
                             state, base_params)

  # ---------------------------------------------------------------- evaluation
  # On resume, points logged after the checkpoint are dropped (they are logged again).
  writer = metrics.create_writer(workdir, resume_step=start_epoch)
  samples_dir = os.path.join(workdir, "samples")
  main_process = jax.process_index() == 0

  def eval_params(st):
    return st.ema_params if st.ema_params is not None else st.params

  def evaluate(trainable, epoch: int) -> dict:
    out = {}
    for split in world.eval_splits:
      ids = world.eval_prompt_ids(split, config.eval_prompts)
      key = jax.random.key(config.eval_seed)

      def fn(chunk, k):
        tokens = placement.batch(tokens_all[chunk], strict=False)
        traj = eval_rollout(trainable, base_params, tokens, k)
        return placement.gather(to_images(base_params, traj.sample))

      judged = world.evaluate(fn, ids, key, config.eval_batch_size)
      if judged is None:  # no independent evaluator: the configured rewards only
        m, images, aligned = {}, _sample_all(fn, ids, key, config.eval_batch_size), None
      else:
        m, images, aligned = judged
      images = np.asarray(images)
      ids = ids[:len(images)]
      rewards = score(images, ids)
      m.update(reward_eval_metrics(reward, rewards, images, world.reward_prompts(ids),
                                   reward_params, judged=judged is not None))
      out.update({f"{split}/{k}": v for k, v in m.items()})
      # The grid: a fixed pick over the caption families (the same prompts and initial
      # noise at every evaluation), each image with its reward and the evaluator's verdict.
      shown = image_grids.shown_samples(images, ids, rewards, aligned, world.families(ids),
                                        seed=config.eval_seed)
      grid = image_grids.sample_grid(shown, world.texts)
      writer.write_images(epoch, {f"samples/{split}": grid})
      if not main_process:
        continue
      image_grids.save_image(os.path.join(samples_dir, f"{split}_epoch{epoch:04d}.png"), grid)
      before_path = os.path.join(samples_dir, f"{split}_before.npz")
      if epoch == 0:  # kept for the before / after grid at the end (resumes included)
        image_grids.save_samples(before_path, shown)
      elif epoch == config.epochs:
        before = image_grids.load_samples(before_path)
        if before is None or list(before["ids"]) != list(shown["ids"]):
          logging.info("no epoch-0 samples of %s in %s: no before / after grid", split,
                       samples_dir)
          continue
        both = image_grids.before_after_grid(before, shown, world.texts, (0, epoch))
        writer.write_images(epoch, {f"samples/{split}/before_after": both})
        image_grids.save_image(os.path.join(samples_dir, f"{split}_before_after.png"), both)
    writer.write_scalars(epoch, {f"eval/{k}": v for k, v in out.items()})
    return out

  # ---------------------------------------------------------------- one epoch
  def sample_and_score(state, ids, k_epoch, record_x0=False, sde_steps=None, with_ref=False):
    tokens = placement.batch(tokens_all[ids])  # each process supplies its rows
    policy = sampling_params if lagged else state.params
    t0 = time.time()
    traj, cond, null = rollout(policy, base_params, tokens, jax.random.fold_in(k_epoch, 0),
                               share=share_within, record_x0=record_x0, sde_steps=sde_steps,
                               with_ref=with_ref)
    jax.block_until_ready(traj)
    t1 = time.time()
    scores = score(to_images(base_params, traj.sample), ids)
    m = group_stats(scores, B)
    m.update(seconds_rollout=t1 - t0, seconds_reward=time.time() - t1)
    return traj, cond, null, scores, m

  def step_values(traj, ids) -> np.ndarray:
    """b [n, T]: the reward of each step's recorded x0 prediction (x0_reward baseline)."""
    n, T = traj.log_probs.shape
    x0 = traj.x0_preds.reshape((n * T,) + traj.x0_preds.shape[2:])  # rows (sample, step)
    return score(to_images(base_params, x0), np.repeat(ids, T)).reshape(n, T)

  def trajectory_epoch(state, epoch, ids, k_epoch):
    with_values = step_baseline != "none"
    sde_mask, train_steps = sde_window(epoch)
    need_ref = obj.needs_ref_log_probs or config.kl_metric
    traj, cond, null, scores, m = sample_and_score(
        state, ids, k_epoch, record_x0=with_values, sde_steps=sde_mask,
        with_ref=need_ref and config.get("ref_in_rollout", False))
    batch = {"latents": traj.latents, "timesteps": traj.timesteps,
             "prev_timesteps": traj.prev_timesteps, "log_probs": traj.log_probs,
             "cond": cond, "null_cond": null, "rewards": placement.batch(scores)}
    if train_steps is not None:
      batch["train_steps"] = jnp.asarray(train_steps)
      m["sde_window_start"] = int(train_steps[0])
    t0 = time.time()
    values = step_values(traj, ids) if with_values else None
    m["seconds_step_values"] = time.time() - t0
    if values is not None:
      corr = step_baselines.value_correlation(scores, values)
      m["baseline_corr_first_step"] = float(corr[0])
      m["baseline_corr_mid_step"] = float(corr[len(corr) // 2])
      values = step_baselines.lambda_baselines(scores, values, o.get("baseline_lambda", 1.0))
    t0 = time.time()
    if need_ref:
      ref = traj.ref_log_probs  # recorded by the rollout (config.ref_in_rollout)
      if ref is None:
        ref = ref_log_probs(base_params, traj, cond, null)
        if sde_mask is not None:  # ODE steps have no density: 0, as the rollout records them
          ref = jnp.where(jnp.asarray(sde_mask)[None], ref, 0.0)
      batch["ref_log_probs"] = ref
      # On the host: op-by-op math on multi-device arrays is what can stall XLA:CPU's
      # collectives (rft.placement.split_cpu).
      m["kl_to_ref"] = float(np.mean(np.sum(placement.gather(traj.log_probs)
                                            - placement.gather(ref), axis=1)))
    m["seconds_ref_log_probs"] = time.time() - t0
    entries, m_prep = obj.prepare(config, ids, scores, values, stats)  # on the host
    m.update(m_prep)
    batch.update({k: placement.batch(np.asarray(v)) for k, v in entries.items()})
    per_sample = ("latents", "log_probs", "rewards", "ref_log_probs", "cond") + tuple(entries)
    groups = np.random.default_rng([config.seed, epoch, 1]).permutation(config.prompts_per_epoch)
    ms = []
    t0 = time.time()
    for k, g in enumerate(minibatches(groups, config.prompts_per_update,
                                      config.updates_per_epoch)):
      mb = _take(placement, batch, group_rows(g, B), per_sample)
      state, um = update(state, base_params, mb, jax.random.fold_in(k_epoch, 10 + k),
                         on_policy=(k == 0))
      ms.append(um)
    jax.block_until_ready(state)
    m["seconds_update"] = time.time() - t0
    return state, m, ms

  def select_sft_epoch(state, epoch, ids, k_epoch):
    traj, cond, null, scores, m = sample_and_score(state, ids, k_epoch)
    entries, m_prep = obj.prepare(config, ids, scores, None, stats)
    m.update(m_prep)
    keep = np.asarray(entries["keep"])
    extra = {k: placement.batch(np.asarray(v)) for k, v in entries.items() if k != "keep"}
    kept = dict(placement.take_rows({"images": traj.sample, "cond": cond}, keep),
                null_cond=null, **extra)
    order = np.random.default_rng([config.seed, epoch, 1]).permutation(len(keep))
    policy = sampling_params if lagged else state.params
    ms = []
    for k, sel in enumerate(minibatches(order, config.prompts_per_update * rows_per_update,
                                        config.updates_per_epoch)):
      b = _take(placement, kept, sel, ("images", "cond") + tuple(extra))
      state, um = update(state, base_params, b, jax.random.fold_in(k_epoch, 10 + k), policy)
      ms.append(um)
    return state, m, ms

  def backprop_epoch(state, epoch, ids, k_epoch):
    ms = []
    for k, sel in enumerate(minibatches(ids, config.prompts_per_update,
                                        config.updates_per_epoch)):
      tokens = placement.batch(tokens_all[sel])
      cond, null = conditions(base_params, tokens)
      b = {"tokens": tokens, "cond": cond, "null_cond": null,
           "prompts": placement.batch(world.reward_prompts(sel), size=len(sel))}
      state, um = update(state, base_params, b, jax.random.fold_in(k_epoch, 10 + k),
                         reward_params)
      ms.append(um)
    # Reward of the samples each update drew (one device sync per epoch, not per update).
    return state, {"reward_mean": float(np.mean([u["reward"] for u in jax.device_get(ms)]))}, ms

  epoch_fn = {"trajectory": trajectory_epoch, "reward_backprop": backprop_epoch,
              "select_sft": select_sft_epoch}[obj.kind]
  rows_per_update = rows_per_prompt(config, obj)[0]

  # ---------------------------------------------------------------- loop
  if start_epoch == 0:
    # The whole config, and as metric columns the final evaluation and training reward.
    judged = getattr(world, "judge", None) is not None
    columns = [f"eval/{split}/{name}" for split in world.eval_splits
               for name in (("alignment",) if judged else ()) + ("config_reward",)
               ] if config.eval_every else []
    writer.write_hparams(config, metrics=columns + ["train/reward_mean"])
    if config.eval_every:
      history["0"] = evaluate(eval_params(state), 0)
      logging.info("%s", loop.eval_line("epoch", 0, history["0"], EVAL_LINE) + "  (base)")
  bar = metrics.ProgressBar(config.epochs, initial=start_epoch, desc=o.name, unit="epoch")
  # Reward backprop samples one image for each of its fresh prompts inside every update.
  backprop = obj.kind == "reward_backprop"
  prompts_per_epoch = (config.prompts_per_update * config.updates_per_epoch if backprop
                       else config.prompts_per_epoch)
  samples_per_epoch = prompts_per_epoch * (1 if backprop else B)
  t_loop = time.time()
  stop = loop.StopSignal()  # SIGTERM: end after this epoch with a checkpoint
  for epoch in range(start_epoch, config.epochs):
    t0 = time.time()
    k_epoch = jax.random.fold_in(key, epoch)
    rng = np.random.default_rng([config.seed, epoch])
    ids = world.sample_prompt_ids(rng, prompts_per_epoch, "train")
    if not backprop:
      ids = np.repeat(ids, B)
    state, m, ums = epoch_fn(state, epoch, ids, k_epoch)
    m.update(loop.mean_metrics(ums))
    done = epoch + 1
    if lagged:  # θ_old ← d θ_old + (1 − d) θ at the optimizer steps taken so far
      d = obj.sampling_decay(config, done * config.updates_per_epoch)
      sampling_params = soft_update(sampling_params, state.params, d)
      m["sampling_decay"] = d
    loop.check_finite(m["loss"], f"{o.name} loss at epoch {done}", ckpt, workdir, "epoch")
    loop.check_diverged(m["param_norm"], start_norm, config.max_param_norm_ratio,
                        f"{o.name} at epoch {done}", ckpt, workdir, "epoch")
    m["reward_queries"] = done * samples_per_epoch
    m["epoch_seconds"] = time.time() - t0
    # Throughput: images sampled per second of the whole epoch (rollout, rewards, update).
    m["samples_per_sec"] = samples_per_epoch / m["epoch_seconds"]
    writer.write_scalars(done, {f"train/{k}": v for k, v in m.items()})
    curve[str(done)] = {k: m[k] for k in CURVE_KEYS if k in m}
    bar.update(done, reward=m["reward_mean"], loss=m["loss"])
    if loop.due(done, config.eval_every, config.epochs):
      t_eval = time.time()
      history[str(done)] = evaluate(eval_params(state), done)
      history[str(done)]["eval_seconds"] = time.time() - t_eval
      history[str(done)]["train/reward_mean_epoch"] = m["reward_mean"]
      logging.info("%s", loop.eval_line("epoch", done, history[str(done)], EVAL_LINE))
    loop.end_of_step(stop, done, config.epochs, config.ckpt_every, lambda: ckpt.save(
        done, ckpt_tree(state), metadata={"history": history, "curve": curve,
                                          "seconds": seconds_before + time.time() - t_start}),
                     writer, workdir, "epoch")
  stop.close()
  bar.close()
  ckpt.close()
  writer.flush()
  # ---------------------------------------------------------------- results
  results = {"objective": o.name, "epochs": config.epochs,
             "reward_queries": config.epochs * samples_per_epoch,
             "train_seconds_this_run": round(time.time() - t_loop, 1),
             "total_seconds_this_run": round(time.time() - t_start, 1),
             "total_seconds": round(seconds_before + time.time() - t_start, 1),
             "samples_per_epoch": samples_per_epoch,
             # what drew the evaluation samples (config.eval_sampler over config.sampler)
             "eval_sampler": dataclasses.asdict(eval_sampler),
             "history": history, "curve": curve}
  final = placement.gather(materialize(eval_params(state), base_params))  # all processes
  ft = config.finetune
  lora_out = ((placement.gather(eval_params(state)), ft.lora_alpha, ft.lora_rank)
              if ft.mode == "lora" else None)  # the adapter alone, for worlds that export it
  loop.write_results(workdir, results)
  if jax.process_index() == 0:
    world.export(final, workdir, o.name, results, lora=lora_out)
  return results
