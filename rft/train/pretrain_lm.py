"""Pretrain the arithmetic-world LM (supervised next-token loss on the answers).

Sections: world -> model -> optimizer/state -> checkpoint/resume -> update step ->
evaluation -> loop -> export. The batch is a pure function of (seed, step), so a resumed
run continues the same curve. The loss is the mean negative log-likelihood of the answer
tokens (answer + EOS) given BOS + prompt: the prompt itself is uniform noise.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rft import checkpoint, metrics, pretrained
from rft.data.arithmetic import ArithmeticWorld
from rft.lm import sampling
from rft.models import lm
from rft.objectives import grpo
from rft.train import loop
from rft.worlds import arith_eval
from rft.train.state import TrainState, lr_schedule, make_optimizer

# The console line of an evaluation (rft.train.loop.eval_line).
EVAL_LINE = (("accuracy greedy", "accuracy_greedy", "%"),
             ("sampled", "accuracy_sampled", "%"))


def build_world(config) -> ArithmeticWorld:
  return ArithmeticWorld(config.max_operand, config.ops, config.holdout_fraction,
                         config.split_seed)


def build_lm_config(model_cfg, vocab_size: int, max_len: int) -> lm.LMConfig:
  return lm.LMConfig(vocab_size=vocab_size, max_position_embeddings=max_len,
                     **dict(model_cfg))


def sft_loss(lm_config, params, batch) -> tuple[jax.Array, dict]:
  """- mean over answer tokens of log p(token | BOS, prompt, previous answer tokens)."""
  lp = sampling.token_log_probs(lm_config, params, batch["prompt"], batch["prompt_mask"],
                                batch["answer"], batch["answer_mask"])
  m = batch["answer_mask"].astype(jnp.float32)
  nll = grpo.sft_loss(lp, m)
  seq_correct = jnp.all((lp > np.log(0.5)) | (m == 0), axis=1)  # argmax-correct proxy
  return nll, {"loss": nll, "token_prob_mean": jnp.sum(jnp.exp(lp) * m) / jnp.sum(m),
               "seq_confident": jnp.mean(seq_correct.astype(jnp.float32))}


def noisy_answers(answers: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
  """Replace a `fraction` of the answers by a wrong one: the true value plus a nonzero
  offset in [-10, 10] (the near misses a careless source would write)."""
  out = list(answers)
  for i in np.flatnonzero(rng.random(len(out)) < fraction):
    offset = int(rng.integers(1, 11)) * (1 if rng.random() < 0.5 else -1)
    out[i] = str(int(out[i]) + offset)
  return out


def lm_meta(lm_config: lm.LMConfig, config) -> dict:
  return {"model": dataclasses.asdict(lm_config),
          "world": {"max_operand": config.max_operand, "ops": config.ops,
                    "holdout_fraction": config.holdout_fraction,
                    "split_seed": config.split_seed},
          "label_noise": config.label_noise}


def train_and_evaluate(config, workdir: str):
  # ---------------------------------------------------------------- world
  world = build_world(config)

  def host_batch(step: int) -> dict:
    rng = np.random.default_rng([config.seed, step])
    ids = world.sample_ids("train", config.batch_size, rng)
    pt, pm = world.prompt_tokens(ids)
    answers = [world.answers[i] for i in ids]
    if config.label_noise > 0:  # a fraction of the corpus carries wrong answers
      answers = noisy_answers(answers, config.label_noise, rng)
    at, am = world.answer_tokens_for(answers)
    return {"prompt": pt, "prompt_mask": pm, "answer": at, "answer_mask": am}

  # ---------------------------------------------------------------- model and state
  lm_config = build_lm_config(config.model, world.tokenizer.vocab_size,
                              world.max_prompt_len + world.max_answer_len + 4)
  model = lm.DecoderLM(lm_config)
  key = jax.random.key(config.seed)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = jax.jit(model.init)(key, dummy, dummy, jnp.ones((1, 4), bool))["params"]
  logging.info("LM params: %d", sum(x.size for x in jax.tree.leaves(params)))
  tx = make_optimizer(config.lr, config.steps, config.warmup, config.weight_decay,
                      config.grad_clip)
  state = TrainState.create(params, tx)

  # ---------------------------------------------------------------- checkpoint / resume
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
  # A mismatching checkpoint is a clear error, never a restart.
  start, state, _ = loop.resume(ckpt, state, workdir)

  # ---------------------------------------------------------------- update step
  lr = lr_schedule(config.lr, config.steps, config.warmup)  # make_optimizer's schedule

  def train_step(state, batch):
    (_, m), grads = jax.value_and_grad(lambda p: sft_loss(lm_config, p, batch),
                                       has_aux=True)(state.params)
    m["grad_norm"] = optax.global_norm(grads)
    m["lr"] = jnp.asarray(lr(state.step), jnp.float32)  # this update's learning rate
    return state.apply_gradients(grads, tx), m

  train_step = jax.jit(train_step, donate_argnums=(0,))

  # ---------------------------------------------------------------- evaluation
  writer = metrics.create_writer(workdir, resume_step=start)  # drops points after `start`

  def evaluate(p, step: int, log: bool = True) -> dict:
    m, examples = arith_eval.evaluate(lm_config, p, world, config.eval_problems)
    if log:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
      writer.write_texts(step, {f"samples/{s}": "\n".join(v) for s, v in examples.items()})
    return m

  # ---------------------------------------------------------------- loop
  if start == 0:  # the whole config; metric columns: final accuracy and loss
    columns = [f"eval/{split}/accuracy_{mode}" for split in ("train", "heldout")
               for mode in ("greedy", "sampled")] if config.eval_every else []
    writer.write_hparams(config, metrics=columns + ["train/loss"])
  bar = metrics.ProgressBar(config.steps, initial=start, desc="pretrain_arith", unit="step")
  t0, results = time.time(), {}
  last_log = (start, time.time())  # (step, time) of the last logged metrics
  stop = loop.StopSignal()  # SIGTERM: end after this step with a checkpoint
  for step in range(start, config.steps):
    state, m = train_step(state, jax.tree.map(jnp.asarray, host_batch(step)))
    done = step + 1
    if done % config.log_every == 0 or done == config.steps:
      m = jax.device_get(m)
      loop.check_finite(float(m["loss"]), f"pretrain_arith loss at step {done}", ckpt, workdir)
      # Throughput since the last logged step (the device_get above waited for it).
      now = time.time()
      m["samples_per_sec"] = config.batch_size * (done - last_log[0]) / (now - last_log[1])
      last_log = (done, now)
      writer.write_scalars(done, {f"train/{k}": v for k, v in m.items()})
      bar.update(done, loss=float(m["loss"]))
    if loop.due(done, config.eval_every, config.steps):  # before the checkpoint: its
      results = evaluate(state.params, done)  # points are then on disk with it
      logging.info("%s", loop.eval_line("step", done, results, EVAL_LINE))
    loop.end_of_step(stop, done, config.steps, config.ckpt_every,
                     lambda: ckpt.save(done, state), writer, workdir)
  stop.close()
  bar.close()
  ckpt.close()

  # ---------------------------------------------------------------- export
  final = jax.device_get(state.params)
  if config.eval_every and not results:  # rerun of a finished run: re-measure
    results = evaluate(final, config.steps, log=False)  # (its points are logged already)
  if jax.process_index() != 0:
    return results
  meta = lm_meta(lm_config, config)
  meta.update(command=pretrained.invocation(), steps=config.steps, results=results,
              train_seconds_this_run=round(time.time() - t0, 1))
  pretrained.export_bundle("arith_base", final, meta, workdir, config.export_dir)
  writer.flush()
  return results


def load_or_pretrain_arith(workdir: str, directory: str | None = None):
  """(LMConfig, params, meta) of the arithmetic base LM: the shipped bundle, or pretrain one
  with configs/pretrain_arith.py in `workdir`/base_model when it is absent."""
  if pretrained.exists("arith_base", directory):
    return pretrained.load_arith_base(directory)
  base_dir = f"{workdir}/base_model"
  logging.warning("no shipped arithmetic LM in %s; pretraining one in %s (a few minutes)",
                  directory or pretrained.ASSETS, base_dir)
  from rft import config as config_lib
  checkpoint.ensure_workdir(base_dir)
  train_and_evaluate(config_lib.load("pretrain_arith"), base_dir)
  return pretrained.load_arith_base(base_dir)
