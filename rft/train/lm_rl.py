"""Online RL for decoder LMs: GRPO, DAPO, Dr.GRPO, GSPO, RLOO, BNPO, RAFT, REBEL and CoPG
on one loop.

    prompts x G -> generate(theta_old) -> reward -> [dynamic sampling] -> advantages
               -> old / ref log-probs -> mu x minibatch updates

Sections: task and base model -> reward -> state -> checkpoint / resume -> log-probs and
updates -> rollout -> evaluation -> loop -> export. Problems, sampling keys and update
order are functions of (seed, step); checkpoints hold the TrainState at step ends, so a
resumed run continues the same curve.

Old log-probs are recomputed by the trainer's own forward (`policy_log_probs`, behind a
custom-VJP island), so the first inner iteration sees ratio == 1 bitwise; the sampler's
log-probs (a cached decode, different matmul shapes) agree to ~1e-6 and are logged as
`sampler_logprob_gap`. With beta == 0 no reference params are held or evaluated.

Task and base model: by default the arithmetic LM shipped in rft/assets on
`ArithmeticWorld` (evaluation accuracy = exact match). With `config.model_path`, a
Llama / Qwen HF checkpoint (`rft.weights.hf_lm.load_lm`) with its tokenizer
(`rft.data.lm_tasks.HFTokenizer`, chat template) on the problems of `config.prompt_file`
(`PromptFileTask`); evaluation accuracy is then the mean of the configured reward, and the
finetuned model is exported as an HF folder, `<workdir>/hf_model`.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rft import checkpoint, metrics, paths, pretrained
from rft.placement import Placement
from rft import config as config_lib
from rft.data import lm_tasks
from rft.data.arithmetic import ArithmeticWorld
from rft.lm import sampling
from rft.objectives import grpo, registry
from rft.rewards import base as rewards_lib
from rft.rewards import dense
from rft.train import loop
from rft.worlds import arith_eval
from rft.train.batching import group_rows, minibatches
from rft.train.pretrain_lm import load_or_pretrain_arith
from rft.train.state import TrainState, lr_schedule, make_optimizer

# Per-step training metrics kept for results.json["curve"].
CURVE_KEYS = ("reward_mean", "loss", "grad_norm", "kl", "completions", "tokens",
              "step_seconds", "rollout_seconds")
# The console line of an evaluation (rft.train.loop.eval_line).
EVAL_LINE = (("accuracy greedy", "accuracy_greedy", "%"),
             ("sampled", "accuracy_sampled", "%"))


def total_updates(config) -> int:
  """Optimizer updates of the whole run at most (the length of the lr schedule)."""
  return config.steps * config.inner_iterations * config.minibatches


def lr_of(config):
  """The optimizer's learning-rate schedule (update count -> lr): constant after a linear
  warmup of config.warmup updates (rft.train.state.lr_schedule)."""
  return lr_schedule(config.lr, total_updates(config), config.warmup, "constant")
from rft.weights import hf_lm, io


# ------------------------------------------------------------------------ log-probs


def _log_probs_and_entropy(lm_config, temperature, params, batch):
  logp = sampling.completion_log_softmax(lm_config, params, batch["prompt"],
                                         batch["prompt_mask"], batch["completion"],
                                         batch["completion_mask"], temperature)
  return (sampling.gather_tokens(logp, batch["completion"]),
          -jnp.sum(jnp.exp(logp) * logp, axis=-1))


# Same reason as rft.diffusion.ddim's island: the forward is compiled behind optimization
# barriers, and its VJP recomputes it, so the log-probs inside a jitted grad step are
# bitwise those of the no-grad forward that produced the stored old log-probs.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def policy_log_probs(lm_config, temperature, params, batch):
  """([B, N] log-probs of the completion tokens at `temperature`, [B, N] entropies)."""
  params, batch = jax.lax.optimization_barrier((params, batch))
  return jax.lax.optimization_barrier(
      _log_probs_and_entropy(lm_config, temperature, params, batch))


def _island_fwd(lm_config, temperature, params, batch):
  return policy_log_probs(lm_config, temperature, params, batch), (params, batch)


def _island_bwd(lm_config, temperature, res, g):
  params, batch = jax.lax.optimization_barrier(res)
  _, vjp = jax.vjp(lambda p: _log_probs_and_entropy(lm_config, temperature, p, batch), params)
  (g_params,) = vjp(g)
  return g_params, jax.tree.map(jnp.zeros_like, batch)


policy_log_probs.defvjp(_island_fwd, _island_bwd)


def make_update(lm_config, config, tx, placement: Placement | None = None, state=None):
  """update(state, mb) -> (state, metrics) of the objective's loss (its registry record).

  With `placement` (and the placed `state` whose layout it fixes) the jit has explicit
  in / out shardings and donates the state; without, shardings follow the arguments.
  """
  obj = registry.lm(config.objective.name)
  kw = obj.settings(config.objective)
  T = config.sampling.temperature

  def loss_fn(params, mb):
    lp, ent = policy_log_probs(lm_config, T, params, mb)
    mask = mb["completion_mask"] * mb["loss_weight"][:, None]
    loss, m = obj.loss(kw, lp, mask, mb)
    denom = jnp.maximum(jnp.sum(mb["completion_mask"]), 1.0)
    m = dict(m, entropy=jnp.sum(jax.lax.stop_gradient(ent) * mb["completion_mask"]) / denom)
    return loss, m

  def update(state, mb):
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb)
    return loop.apply_update(state, grads, tx, dict(m, loss=loss), lr=lr_of(config))

  if placement is None:
    return jax.jit(update, donate_argnums=(0,))
  return placement.jit_update(update, state, num_args=2)


def loss_tokens(host: dict) -> np.ndarray:
  """[N] loss-token count of each row: Σ_t completion_mask · loss_weight."""
  return (np.asarray(host["completion_mask"], np.float32)
          * np.asarray(host["loss_weight"], np.float32)[:, None]).sum(axis=1)


def minibatch_plan(config, step: int, it: int, num_groups: int, row_tokens: np.ndarray):
  """(row indices of each minibatch of inner iteration `it`, the loss-token count of all
  of them together).

  Minibatches are whole groups, drawn from a permutation that is a function of (seed,
  step, it). The count (every minibatch's rows, every process's rows: the host batch
  holds them all) is what the loss receives as the batch column "step_loss_tokens", so a
  token-mean over the whole step (the dapo aggregation) is the sum of the minibatch
  losses.
  """
  G = config.group_size
  order = np.random.default_rng([config.seed, step, it]).permutation(num_groups)
  rows = [group_rows(g, G) for g in minibatches(order, max(num_groups // config.minibatches, 1),
                                                config.minibatches)]
  return rows, float(sum(row_tokens[idx].sum() for idx in rows))


# ------------------------------------------------------------------------ task and model


def load_task_and_model(config, workdir: str):
  """(lm_config, base params, task, info): the arithmetic LM and world, or (model_path) an
  HF checkpoint, its tokenizer and the PromptFileTask of config.prompt_file.

  info is the arith bundle's metadata, or {"model_dir": the resolved HF folder}.
  """
  if not config.model_path:
    if config.prompt_file:
      raise ValueError(f"config.prompt_file={config.prompt_file!r} needs config.model_path "
                       f"(a HF model folder or hub id); without it the run trains the "
                       f"arithmetic LM on its own problems")
    lm_config, params, meta = load_or_pretrain_arith(workdir, config.base_dir or None)
    return lm_config, params, ArithmeticWorld(**meta["world"]), meta
  if config.base_dir:
    raise ValueError(f"config.base_dir={config.base_dir!r} (an arithmetic LM bundle) and "
                     f"config.model_path={config.model_path!r} are both set; keep one")
  if not config.prompt_file:
    raise ValueError(f"config.model_path={config.model_path!r} needs config.prompt_file: pass "
                     f"--config.prompt_file=PATH ({lm_tasks.FORMATS} of problems with "
                     f"'prompt' and 'answer' fields)")
  model_dir = hf_lm.resolve_model_dir(config.model_path)
  # Tokenizer and problems first: a bad prompt file fails before the weights load.
  tok = lm_tasks.HFTokenizer(hf_lm.load_tokenizer(model_dir),
                             extra_eos_ids=lm_tasks.generation_eos_ids(model_dir))
  task = lm_tasks.PromptFileTask(
      config.prompt_file, tok, prompt_key=config.prompt_key, answer_key=config.answer_key,
      system_prompt=config.system_prompt or None, use_chat_template=config.use_chat_template,
      heldout_fraction=config.heldout_fraction, max_prompt_len=config.max_prompt_len,
      max_answer_len=config.sampling.max_new_tokens)
  with io.pickle_key("allow_pickle"):  # a refusal names --config.allow_pickle
    lm_config, params = hf_lm.load_lm(model_dir, allow_pickle=config.allow_pickle)
  if tok.vocab_size > lm_config.vocab_size:
    raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} ids but the model's "
                     f"vocab_size is {lm_config.vocab_size}")
  logging.info("model %s (%s), prompt file %s", model_dir, lm_config.model_type,
               config.prompt_file)
  return lm_config, params, task, {"model_dir": model_dir}


def export_hf(workdir: str, lm_config, params, model_dir: str, meta: dict) -> str:
  """<workdir>/hf_model: config.json + model.safetensors (hf_lm.save_lm), the tokenizer
  and generation files of `model_dir`, and rft_meta.json (command, results)."""
  out = hf_lm.save_lm(os.path.join(workdir, "hf_model"), lm_config, params)
  for name in lm_tasks.TOKENIZER_FILES:
    src = paths.path(model_dir) / name
    if src.is_file():
      paths.write_bytes(os.path.join(out, name), src.read_bytes())
  paths.write_json(os.path.join(out, "rft_meta.json"), meta, indent=2, sort_keys=True)
  return out


# ------------------------------------------------------------------------ the loop


def validate(config) -> registry.LMObjective:
  """The objective's record (an unknown name lists the registered ones), after its checks."""
  config_lib.check_required(config)
  obj = registry.lm(config.objective.name)
  if config.objective.get("process_rewards", False) and obj.name != "grpo":
    raise ValueError(f"config.objective.process_rewards is a GRPO option (per-token "
                     f"advantages); config.objective.name={obj.name!r} does not read it")
  if obj.check is not None:
    obj.check(config)
  if config.prompts_per_step % config.minibatches:
    raise ValueError(f"config.prompts_per_step={config.prompts_per_step} must be divisible by "
                     f"config.minibatches={config.minibatches} (whole groups per minibatch)")
  return obj


def train_and_evaluate(config, workdir: str):
  obj = validate(config)
  o = config.objective
  t_start = time.time()
  # ---------------------------------------------------------------- task and base model
  placement = Placement.from_config(config)  # config.mesh, config.sharding
  Q = config.prompts_per_step
  placement.check_rows(Q * config.group_size, "config.prompts_per_step * config.group_size")
  placement.check_rows(Q // config.minibatches * config.group_size,
                       "config.prompts_per_step / config.minibatches * config.group_size")
  lm_config, base_params, world, meta = load_task_and_model(config, workdir)
  tok = world.tokenizer
  stops = tuple(tok.stop_sequences)
  G, Q = config.group_size, config.prompts_per_step
  sc = sampling.SamplingConfig(max_new_tokens=config.sampling.max_new_tokens,
                               temperature=config.sampling.temperature,
                               top_k=config.sampling.top_k, top_p=config.sampling.top_p)
  # ---------------------------------------------------------------- reward
  reward = rewards_lib.build(config.reward, options=config.get("reward_options"))
  kw = obj.settings(o)

  terms = reward.terms or ((1.0, reward),)
  term_weights = np.asarray([w for w, _ in terms], np.float32)

  def targets_of(ids) -> dict:
    # Text rewards read the reference answers ("answers"); reward models the prompts.
    return {"answers": [world.answers[i] for i in ids],
            "prompts": [world.prompts[i] for i in ids]}

  def score(texts, ids):
    """[N, R] per-term rewards (weights in term_weights; their weighted sum is the reward)."""
    targets = targets_of(ids)
    out = np.stack([np.asarray(r(texts, targets), np.float32) for _, r in terms], axis=1)
    rewards_lib.check_finite_rewards(out, config.reward, [r.name for _, r in terms])
    return out

  # Process rewards (config.objective.process_rewards): the reward's per-step values and
  # the token ending each step, for per-token advantages (rft.rewards.dense).
  dense_term = (dense.dense_reward(reward) if o.get("process_rewards", False) else None)

  def step_rewards(texts, ids, tokens, mask) -> dict:
    per = dense_term.steps_fn(texts, targets_of(ids))
    lengths = np.asarray(mask).sum(axis=1).astype(int)
    rewards_, tokens_ = np.empty(len(per), object), np.empty(len(per), object)
    for i, (ends, r) in enumerate(per):
      rewards_[i] = np.asarray(r, np.float32)
      tokens_[i] = dense.step_tokens(tok, tokens[i], lengths[i], ends)
    return {"step_rewards": rewards_, "step_tokens": tokens_}

  weights_with_overlong = (np.append(term_weights, 1.0) if o.overlong_buffer > 0
                           else term_weights)
  if config.reward_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
    raise ValueError(f"config.reward_aggregation={config.reward_aggregation!r}; use "
                     f"'sum_then_normalize' or 'normalize_then_sum'")

  # ---------------------------------------------------------------- state
  tx = make_optimizer(config.lr, total_updates(config), config.warmup, config.weight_decay,
                      config.grad_clip, config.adam_b1, config.adam_b2, schedule="constant",
                      eps=config.get("adam_eps", 1e-8))
  # Created already sharded (config.sharding.trained; Adam moments follow the params).
  state = placement.create_state(lambda p: TrainState.create(p, tx), base_params)
  start_norm = loop.params_norm(state.params)  # before training: loop.check_diverged
  ref_params = placement.put_frozen(base_params) if obj.uses_reference(kw) else None
  logging.info("LM RL %s %s: %d params, %s reference", o.name, obj.label(config),
               sum(x.size for x in jax.tree.leaves(base_params)),
               "with" if ref_params is not None else "no")

  # ---------------------------------------------------------------- checkpoint / resume
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
  start, state, ck_meta = loop.resume(ckpt, state, workdir)
  # history: evaluations by step; curve: per-step training metrics (CURVE_KEYS);
  # seconds_before: wall seconds of the runs this one resumes
  history, curve = ck_meta.get("history", {}), ck_meta.get("curve", {})
  seconds_before = float(ck_meta.get("seconds", 0.0))

  # ---------------------------------------------------------------- log-probs and updates
  update = make_update(lm_config, config, tx, placement, state)
  log_probs_fn = jax.jit(lambda p, b: policy_log_probs(lm_config, sc.temperature, p, b))

  # ---------------------------------------------------------------- rollout
  generated = {"completions": 0, "tokens": 0}  # by the rollouts of the current step

  def rollout(params, ids, key) -> dict:
    pt, pm = world.prompt_tokens(ids)
    prompts = placement.batch({"t": pt, "m": pm})  # each process supplies its rows
    out = sampling.generate(lm_config, params, prompts["t"], prompts["m"], key,
                            sampling=sc, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            stop_sequences=stops)
    out = placement.gather(out)  # every process decodes and scores every completion
    texts = sampling.decode_texts(tok, out)
    r_terms = score(texts, ids)
    lengths = np.asarray(out.lengths)
    if o.overlong_buffer > 0:  # DAPO soft overlong punishment, one more term of weight 1
      r_terms = np.concatenate([r_terms, np.asarray(grpo.soft_overlong_punishment(
          lengths, sc.max_new_tokens, o.overlong_buffer), np.float32)[:, None]], axis=1)
    r = r_terms @ weights_with_overlong
    generated["completions"] += len(lengths)
    generated["tokens"] += int(lengths.sum())
    b = {"prompt": pt, "prompt_mask": pm, "completion": np.asarray(out.tokens),
         "completion_mask": np.asarray(out.mask), "sampler_log_probs": np.asarray(out.log_probs),
         "truncated": np.asarray(out.truncated), "lengths": lengths, "rewards": r,
         "reward_terms": r_terms,
         "ids": np.asarray(ids), "texts": np.asarray(texts, dtype=object)}
    if dense_term is not None:
      b.update(step_rewards(texts, ids, b["completion"], b["completion_mask"]))
    return b

  def sample_groups(params, rng, key) -> tuple[dict, dict]:
    """Q groups of G completions; with dynamic sampling, only groups whose rewards differ,
    refilled from further rounds (up to objective.max_rounds) so the batch keeps Q groups."""
    def one_round(r):
      ids = np.repeat(world.sample_ids("train", Q, rng), G)
      b = rollout(params, ids, jax.random.fold_in(key, r))
      return b["rewards"], b

    if not obj.dynamic_sampling(config):
      return one_round(0)[1], {"sampling_rounds": 1.0}
    b, info = grpo.fill_batch(one_round, G, Q, o.max_rounds)
    return b, {"sampling_rounds": float(info["rounds"]),
               "groups_kept_fraction": float(info["kept_fraction"])}

  # ---------------------------------------------------------------- evaluation
  writer = metrics.create_writer(workdir, resume_step=start)

  def evaluate(params, step: int) -> dict:
    # Arithmetic: exact match (the numbers of the shipped results); a prompt file: the
    # configured reward, with the training completion budget.
    m, examples = arith_eval.evaluate(
        lm_config, params, world, config.eval_problems, config.eval_seed, sc.temperature,
        reward=reward if config.model_path else None,
        max_new_tokens=world.max_answer_len if config.model_path else None,
        placement=placement)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
    writer.write_texts(step, {f"samples/{s}": "\n".join(v) for s, v in examples.items()})
    return m

  # ---------------------------------------------------------------- loop
  if start == 0:
    # The whole config, and as metric columns the final evaluation and training reward.
    columns = [f"eval/{split}/accuracy_{mode}" for split in ("train", "heldout")
               for mode in ("greedy", "sampled")] if config.eval_every else []
    writer.write_hparams(config, metrics=columns + ["train/reward_mean"])
  if start == 0 and config.eval_every:
    history["0"] = evaluate(state.params, 0)
    logging.info("%s", loop.eval_line("step", 0, history["0"], EVAL_LINE) + "  (base)")
  bar = metrics.ProgressBar(config.steps, initial=start, desc=f"{o.name}:{obj.label(config)}",
                            unit="step")
  t_loop = time.time()
  stop = loop.StopSignal()  # SIGTERM: end after this step with a checkpoint
  for step in range(start, config.steps):
    t0 = time.time()
    rng = np.random.default_rng([config.seed, step])
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    generated.update(completions=0, tokens=0)
    b, m = sample_groups(state.params, rng, key)
    rollout_seconds = time.time() - t0
    rewards = b["rewards"]
    groups = rewards.reshape(-1, G)
    if len(terms) > 1:
      m.update({f"reward/{r.name}": float(b["reward_terms"][:, k].mean())
                for k, (_, r) in enumerate(terms)})
    m.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
             zero_std_groups=float(np.mean(groups.std(axis=1) < 1e-6)),
             length_mean=float(b["lengths"].mean()), length_max=float(b["lengths"].max()),
             truncated_fraction=float(b["truncated"].mean()))
    # (fewer rows than planned only with dynamic sampling: replicated if indivisible)
    host = {k: b[k] for k in ("prompt", "prompt_mask", "completion", "completion_mask")}
    entries, m_prep = obj.prepare(config, kw, b, G, weights_with_overlong)  # loss_weight, ...
    host.update(entries)
    m.update(m_prep)
    batch = placement.batch(host, strict=False)
    old_lp, _ = log_probs_fn(state.params, batch)
    batch["old_log_probs"] = old_lp
    m["sampler_logprob_gap"] = float(np.max(np.abs(placement.gather(old_lp)
                                                   - b["sampler_log_probs"])
                                            * b["completion_mask"]))
    if ref_params is not None:
      batch["ref_log_probs"], _ = log_probs_fn(ref_params, batch)
    # Fewer than Q groups only when dynamic sampling ran out of rounds (fill_batch then
    # returns what it kept); slicing Q groups would silently repeat rows (JAX clamps).
    num_groups = len(rewards) // G
    m["groups_in_batch"] = float(num_groups)
    row_tokens = loss_tokens(host)
    ums = []
    for it in range(config.inner_iterations if num_groups else 0):
      rows, step_tokens = minibatch_plan(config, step, it, num_groups, row_tokens)
      for idx in rows:
        mb = placement.take_rows(batch, idx, strict=False)
        mb["step_loss_tokens"] = placement.batch(
            np.full(len(idx), step_tokens, np.float32), strict=False)
        state, um = update(state, mb)
        ums.append(um)
    if not ums:
      logging.warning("step %d: every sampled group's rewards agree after %d rounds; no "
                      "update", step + 1, o.max_rounds)
      ums = [{"loss": 0.0}]
    ums = jax.device_get(ums)  # one device sync for every update's metrics
    m.update(loop.mean_metrics(ums))
    m["first_update_ratio_mean"] = float(ums[0].get("ratio_mean", 1.0))
    done = step + 1
    loop.check_finite(m["loss"], f"{o.name} loss at step {done}", ckpt, workdir)
    loop.check_diverged(m.get("param_norm", start_norm), start_norm,
                        config.max_param_norm_ratio, f"{o.name} at step {done}", ckpt, workdir)
    m["step_seconds"] = time.time() - t0
    # Throughput: completions and their tokens generated (every dynamic-sampling round
    # counted) per second of the rollout (generation, decoding, rewards) and of the step.
    m["rollout_seconds"] = rollout_seconds
    m.update(generated)
    for what, count in generated.items():
      m[f"{what}_per_sec_rollout"] = count / rollout_seconds
      m[f"{what}_per_sec"] = count / m["step_seconds"]
    writer.write_scalars(done, {f"train/{k}": v for k, v in m.items()})
    curve[str(done)] = {k: m[k] for k in CURVE_KEYS if k in m}
    if done % config.log_every == 0 or done == config.steps:
      writer.write_texts(done, {"samples/rollouts": "\n".join(
          f"{world.prompts[i]}{world.completion_separator}{t}  (reward {r:.2f})"
          for i, t, r in zip(b["ids"][:G * 2], b["texts"][:G * 2], rewards[:G * 2]))})
    bar.update(done, reward=m["reward_mean"], loss=m["loss"])
    if loop.due(done, config.eval_every, config.steps):
      history[str(done)] = evaluate(state.params, done)
      history[str(done)]["train/reward_mean_step"] = m["reward_mean"]
      logging.info("%s", loop.eval_line("step", done, history[str(done)], EVAL_LINE))
    loop.end_of_step(stop, done, config.steps, config.ckpt_every,
                     lambda: ckpt.save(done, state, metadata={
                         "history": history, "curve": curve,
                         "seconds": seconds_before + time.time() - t_start}),
                     writer, workdir)
  stop.close()
  bar.close()
  ckpt.close()
  writer.flush()
  # ---------------------------------------------------------------- results and export
  # completions the reward scored (every dynamic-sampling round counted)
  queries = int(sum(c.get("completions", 0) for c in curve.values()))
  results = {"objective": o.name, "loss": obj.label(config),
             "steps": config.steps, "completions_per_step": Q * G,
             "train_seconds_this_run": round(time.time() - t_loop, 1),
             "total_seconds_this_run": round(time.time() - t_start, 1),
             "total_seconds": round(seconds_before + time.time() - t_start, 1),
             "reward_queries": queries,
             # completions per step (Q x G, more with dynamic sampling's extra rounds)
             "samples_per_epoch": round(queries / max(len(curve), 1)),
             "history": history, "curve": curve}
  final = placement.gather(state.params)  # on every process (a collective)
  loop.write_results(workdir, results)
  if jax.process_index() == 0:
    if config.model_path:
      export_hf(workdir, lm_config, final, meta["model_dir"],
                {"command": pretrained.invocation(), "objective": o.name,
                 "finetuned_from": meta["model_dir"], "prompt_file": config.prompt_file,
                 "reward": config.reward, "results": results})
    else:
      bundle_meta = dict(meta, command=pretrained.invocation(), objective=o.name,
                         finetuned_from=config.base_dir or "rft/assets/arith_base",
                         results=results)
      pretrained.save_bundle("arith_base", final, bundle_meta, workdir)
  return results
