"""Train a reward model from preference pairs and / or ratings (trainer `reward_model`).

Sections: data -> model -> optimizer / state -> checkpoint / resume -> update step ->
evaluation -> loop -> export.

* **Data** (rft.reward_models.data): the arithmetic world's pairs (correct vs near-miss
  answer, ties, label noise, Llama-2 margins) and ratings, generated per step as a
  function of (seed, step); or the pairs / ratings of jsonl / parquet files
  (`config.pair_file`, `config.rating_file`), sampled per step the same way.
* **Model** (rft.reward_models.model): a scalar head on the arithmetic LM's last hidden
  state (last token or mean), initialised from the shipped arithmetic base
  (`config.init="base"`, `config.base_dir`) or at random (`config.init="random"`,
  `config.model`).
* **Loss** (rft.reward_models.losses), `config.loss`: "bt" (Bradley–Terry with margins
  and ties), "regression" (MSE on ratings) or "both" (bt_weight * BT +
  regression_weight * MSE).
* **Evaluation** on fixed clean pairs (no label noise) of the training and held-out
  problems (files: rows): pairwise accuracy, expected calibration error of
  σ(r_c - r_r), the mean reward gap, accuracy by category (report.md, a RewardBench-style
  table) and, with ratings, the rating MSE and correlation.
* **Export**: `<workdir>/reward_model.{msgpack,json}`, loaded by the reward
  "lm_reward_model" (rft.rewards.reward_model) and by rft.reward_models.model.load.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rft import checkpoint, metrics, paths, pretrained
from rft import config as config_lib
from rft.data.arithmetic import ArithmeticWorld, CharTokenizer
from rft.models import lm
from rft.reward_models import data, losses
from rft.reward_models import model as rm
from rft.train import loop
from rft.train.state import TrainState, lr_schedule, make_optimizer

LOSSES = ("bt", "regression", "both")
EVAL_LINE = (("pair accuracy", "pair_accuracy", "%"), ("ECE", "ece", "f"),
             ("rating MSE", "rating_mse", "f"))


def check_config(config) -> None:
  """ValueError naming the key for values outside what the trainer takes (and for a
  required key still unset, e.g. :file's pair_file)."""
  config_lib.check_required(config)
  bad = []
  if config.loss not in LOSSES:
    bad.append(f"config.loss={config.loss!r} (use one of {LOSSES})")
  if config.data not in ("arithmetic", "file"):
    bad.append(f"config.data={config.data!r} (use 'arithmetic' or 'file')")
  if config.pooling not in rm.POOLINGS:
    bad.append(f"config.pooling={config.pooling!r} (use one of {rm.POOLINGS})")
  if config.init not in ("base", "random"):
    bad.append(f"config.init={config.init!r} (use 'base' or 'random')")
  if config.margin not in ("none", *losses.LLAMA2_MARGINS):
    bad.append(f"config.margin={config.margin!r} (use 'none', 'small' or 'large')")
  for key in ("label_noise", "tie_fraction", "wrong_fraction"):
    if not 0.0 <= config[key] <= 1.0:
      bad.append(f"config.{key}={config[key]!r} (a probability in [0, 1])")
  for key in ("bt_weight", "regression_weight"):
    if config[key] < 0:
      bad.append(f"config.{key}={config[key]!r} (must be >= 0)")
  if config.data == "file":
    if config.loss in ("bt", "both") and not config.pair_file:
      bad.append(f"config.pair_file is empty (config.loss={config.loss!r} needs pairs)")
    if config.loss in ("regression", "both") and not config.rating_file:
      bad.append(f"config.rating_file is empty (config.loss={config.loss!r} needs ratings)")
  if bad:
    raise ValueError("reward-model config: " + "; ".join(bad))


# ------------------------------------------------------------------ data

def _flip(pairs: data.Pairs, rate: float, rng) -> data.Pairs:
  """Chosen and rejected of strict pairs swapped with probability `rate`."""
  flip = (rng.random(len(pairs)) < rate) & (pairs.label > 0.5)
  sw = lambda a, b: [y if f else x for x, y, f in zip(a, b, flip)]
  return data.Pairs(pairs.prompts, sw(pairs.chosen, pairs.rejected),
                    sw(pairs.rejected, pairs.chosen), pairs.label, pairs.margin,
                    pairs.categories, pairs.where)


class Source:
  """Training batches as a function of the step, and fixed clean evaluation sets."""

  def __init__(self, config):
    self.config = c = config
    self.tokenizer = CharTokenizer()
    self.uses_pairs = c.loss in ("bt", "both")
    self.uses_ratings = c.loss in ("regression", "both")
    if c.data == "arithmetic":
      self.world = ArithmeticWorld(c.max_operand, c.ops, c.holdout_fraction, c.split_seed)
      self.split_ids = self.world.split_ids
    else:
      self.files = {}
      for kind, path in (("pairs", c.pair_file), ("ratings", c.rating_file)):
        if path and (self.uses_pairs if kind == "pairs" else self.uses_ratings):
          rows, splits = data.read_file(path, kind)
          ids = data.split_rows(splits, c.heldout_fraction, c.split_seed)
          # Every row is encoded once here: a bad text fails before training, naming
          # its file and line.
          self._encode(rows)
          self.files[kind] = (rows, ids)

  def _encode(self, rows):
    if isinstance(rows, data.Pairs):
      return (data.encode(self.tokenizer, rows.prompts, rows.chosen, self.config.max_len,
                          rows.where),
              data.encode(self.tokenizer, rows.prompts, rows.rejected, self.config.max_len,
                          rows.where))
    return data.encode(self.tokenizer, rows.prompts, rows.responses, self.config.max_len,
                       rows.where)

  def pairs(self, split: str, n: int, rng, clean: bool) -> data.Pairs:
    c = self.config
    noise = 0.0 if clean else c.label_noise
    if c.data == "arithmetic":
      ids = self.world.sample_ids(split, n, rng)
      return data.arithmetic_pairs(self.world, ids, rng, label_noise=noise,
                                   tie_fraction=c.tie_fraction, margin=c.margin,
                                   min_offset=c.min_offset, max_offset=c.max_offset)
    rows, ids = self.files["pairs"]
    return _flip(rows.take(rng.choice(ids[split], n)), noise, rng)

  def ratings(self, split: str, n: int, rng, clean: bool) -> data.Ratings:
    c = self.config
    noise = 0.0 if clean else c.label_noise
    if c.data == "arithmetic":
      ids = self.world.sample_ids(split, n, rng)
      return data.arithmetic_ratings(self.world, ids, rng, label_noise=noise,
                                     wrong_fraction=c.wrong_fraction,
                                     min_offset=c.min_offset, max_offset=c.max_offset)
    rows, ids = self.files["ratings"]
    out = rows.take(rng.choice(ids[split], n))
    if noise:  # ratings in [lo, hi] mirrored with probability `noise`
      flip = rng.random(len(out)) < noise
      lo, hi = float(rows.rating.min()), float(rows.rating.max())
      out.rating = np.where(flip, lo + hi - out.rating, out.rating).astype(np.float32)
    return out

  def splits(self, kind: str) -> list:
    """The splits that hold rows of `kind` ("pairs" / "ratings")."""
    if self.config.data == "arithmetic":
      return ["train", "heldout"]
    return [s for s in ("train", "heldout") if len(self.files[kind][1][s])]

  def batch(self, step: int) -> dict:
    c = self.config
    rng = np.random.default_rng([c.seed, step])
    out = {}
    if self.uses_pairs:
      p = self.pairs("train", c.batch_size, rng, clean=False)
      (tc, mc), (tr, mr) = self._encode(p)
      out.update(chosen=tc, chosen_mask=mc, rejected=tr, rejected_mask=mr,
                 label=p.label, margin=p.margin)
    if self.uses_ratings:
      r = self.ratings("train", c.rating_batch_size, rng, clean=False)
      t, m = self._encode(r)
      out.update(rated=t, rated_mask=m, rating=r.rating)
    return out

  def eval_sets(self) -> dict:
    """{(kind, split): (rows, encoded)}: fixed, clean (no label noise) sets. Arithmetic:
    `eval_pairs` drawn per split with `eval_seed`; files: every row of the split (at most
    `eval_pairs`, the first ones)."""
    c = self.config
    out = {}
    for kind, used in (("pairs", self.uses_pairs), ("ratings", self.uses_ratings)):
      if not used:
        continue
      for split in self.splits(kind):
        rng = np.random.default_rng([c.eval_seed, 3, ["train", "heldout"].index(split)])
        if c.data == "arithmetic":
          make = self.pairs if kind == "pairs" else self.ratings
          rows = make(split, c.eval_pairs, rng, clean=True)
        else:
          all_rows, ids = self.files[kind]
          rows = all_rows.take(ids[split][:c.eval_pairs])
        out[(kind, split)] = (rows, self._encode(rows))
    return out


# ------------------------------------------------------------------ model

def build_model(config, workdir: str, tokenizer) -> tuple[lm.LMConfig, dict, dict]:
  """(LMConfig, initial params, what it was initialised from)."""
  key = jax.random.key(config.seed)
  if config.init == "base":
    from rft.train.pretrain_lm import load_or_pretrain_arith  # pylint: disable=g-import-not-at-top
    lm_config, base, meta = load_or_pretrain_arith(workdir, config.base_dir or None)
    if lm_config.vocab_size != tokenizer.vocab_size:
      raise ValueError(f"config.base_dir={config.base_dir!r}: the base LM's vocabulary has "
                       f"{lm_config.vocab_size} ids, the arithmetic tokenizer "
                       f"{tokenizer.vocab_size}")
    return lm_config, rm.init_params(lm_config, config.pooling, key, base), {
        "init": "base", "base_dir": config.base_dir or "assets",
        "base_command": meta.get("command", "")}
  lm_config = lm.LMConfig(vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=config.max_len, **dict(config.model))
  return lm_config, rm.init_params(lm_config, config.pooling, key), {"init": "random"}


# ------------------------------------------------------------------ evaluation

def evaluate_sets(score_fn, params, sets: dict, bins: int, batch: int = 512) -> tuple[dict, dict]:
  """(scalar metrics {"<split>/<name>": value}, per-category report {split: {...}})."""

  def rewards(t, m):
    out = []
    for s in range(0, len(t), batch):
      tt, mm = t[s:s + batch], m[s:s + batch]
      n, pad = len(tt), (-len(tt)) % 8
      if pad:
        tt, mm = np.concatenate([tt, tt[-1:].repeat(pad, 0)]), np.concatenate(
            [mm, mm[-1:].repeat(pad, 0)])
      out.append(np.asarray(score_fn(params, tt, mm))[:n])
    return np.concatenate(out)

  scalars, report = {}, {}
  for (kind, split), (rows, enc) in sets.items():
    if kind == "pairs":
      (tc, mc), (tr, mr) = enc
      rc, rr = rewards(tc, mc), rewards(tr, mr)
      strict, tie = rows.label > 0.5, rows.label == 0.5
      scalars[f"{split}/pair_accuracy"] = losses.pairwise_accuracy(rc, rr, rows.label)
      scalars[f"{split}/ece"] = losses.expected_calibration_error(rc, rr, rows.label, bins)
      scalars[f"{split}/bt_loss"] = float(losses.bradley_terry_loss(rc, rr, rows.margin,
                                                                     rows.label))
      if strict.any():
        scalars[f"{split}/reward_gap"] = float(np.mean(rc[strict] - rr[strict]))
      if tie.any():
        scalars[f"{split}/tie_abs_gap"] = float(np.mean(np.abs(rc[tie] - rr[tie])))
      report[split] = losses.accuracy_by_category(rc, rr, rows.categories, rows.label)
    else:
      t, m = enc
      r = rewards(t, m)
      scalars[f"{split}/rating_mse"] = float(losses.regression_loss(r, rows.rating))
      if np.std(r) > 0 and np.std(rows.rating) > 0:
        scalars[f"{split}/rating_corr"] = float(np.corrcoef(r, rows.rating)[0, 1])
  return scalars, report


_SYMBOLS = {"+": "plus", "-": "minus", "*": "times", "=": "_", " ": "_"}


def tag_name(category: str) -> str:
  """A TensorBoard-legal tag for a category ("operator=+" -> "operator_plus"), distinct
  for the arithmetic operators (TensorBoard would turn + and * both into _)."""
  s = "".join(_SYMBOLS.get(ch, ch) for ch in category)
  return "".join(ch if ch.isalnum() or ch in "_.-/" else "_" for ch in s)


def report_markdown(results: dict, report: dict) -> str:
  """A RewardBench-style table: accuracy (and pair count) per category and split."""
  lines = ["# Reward model evaluation", "",
           "| split | pair accuracy | ECE | reward gap |", "|---|---|---|---|"]
  for split in ("train", "heldout"):
    if f"{split}/pair_accuracy" in results:
      lines.append(f"| {split} | {100 * results[f'{split}/pair_accuracy']:.1f} % | "
                   f"{results[f'{split}/ece']:.3f} | "
                   f"{results.get(f'{split}/reward_gap', float('nan')):.3f} |")
  for split, cats in report.items():
    lines += ["", f"## {split}: accuracy by category", "", "| category | accuracy | pairs |",
              "|---|---|---|"]
    lines += [f"| {k} | {100 * v['accuracy']:.1f} % | {v['pairs']} |" for k, v in cats.items()]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ trainer

def train_and_evaluate(config, workdir: str):
  check_config(config)
  # ---------------------------------------------------------------- data
  source = Source(config)
  eval_sets = source.eval_sets()

  # ---------------------------------------------------------------- model and state
  lm_config, params, init_info = build_model(config, workdir, source.tokenizer)
  logging.info("reward model: %d params (%s init, %s pooling), loss %s",
               sum(x.size for x in jax.tree.leaves(params)), init_info["init"],
               config.pooling, config.loss)
  tx = make_optimizer(config.lr, config.steps, config.warmup, config.weight_decay,
                      config.grad_clip, schedule=config.schedule)
  lr = lr_schedule(config.lr, config.steps, config.warmup, config.schedule)
  state = TrainState.create(jax.tree.map(jnp.asarray, params), tx)
  start_norm = loop.params_norm(state.params)

  # ---------------------------------------------------------------- checkpoint / resume
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=2)
  start, state, ck_meta = loop.resume(ckpt, state, workdir)
  history = ck_meta.get("history", {})

  # ---------------------------------------------------------------- update step
  pooling = config.pooling
  score = lambda p, t, m: rm.scores(lm_config, pooling, p, t, m)
  use_bt, use_reg = source.uses_pairs, source.uses_ratings

  def loss_fn(p, b):
    m, bt, reg = {}, 0.0, 0.0
    if use_bt:
      n = b["chosen"].shape[0]
      r = score(p, jnp.concatenate([b["chosen"], b["rejected"]]),
                jnp.concatenate([b["chosen_mask"], b["rejected_mask"]]))
      rc, rr = r[:n], r[n:]
      bt = losses.bradley_terry_loss(rc, rr, b["margin"], b["label"])
      strict = (b["label"] > 0.5).astype(jnp.float32)
      m["bt_loss"] = bt
      m["pair_accuracy"] = jnp.sum((rc > rr) * strict) / jnp.maximum(jnp.sum(strict), 1)
    if use_reg:
      reg = losses.regression_loss(score(p, b["rated"], b["rated_mask"]), b["rating"])
      m["rating_mse"] = reg
    if use_bt and use_reg:
      loss = losses.combined_loss(bt, reg, config.bt_weight, config.regression_weight)
    else:
      loss = bt if use_bt else reg
    m["loss"] = loss
    return loss, m

  def train_step(state, batch):
    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    return loop.apply_update(state, grads, tx, m, lr=lr)

  train_step = jax.jit(train_step, donate_argnums=(0,))
  score_fn = jax.jit(score)

  # ---------------------------------------------------------------- evaluation
  writer = metrics.create_writer(workdir, resume_step=start)
  report = {}

  def evaluate(p, step: int) -> dict:
    nonlocal report
    m, report = evaluate_sets(score_fn, p, eval_sets, config.eval_bins)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
    writer.write_scalars(step, {f"eval/{split}/category/{tag_name(k)}": v["accuracy"]
                                for split, cats in report.items() for k, v in cats.items()})
    history[str(step)] = m
    logging.info("%s", loop.eval_line("step", step, m, EVAL_LINE))
    return m

  # ---------------------------------------------------------------- loop
  if start == 0:
    writer.write_hparams(config, metrics=["eval/heldout/pair_accuracy", "eval/heldout/ece",
                                          "train/loss"])
    if config.eval_every:
      evaluate(state.params, 0)  # the untrained head: the "before" row
  bar = metrics.ProgressBar(config.steps, initial=start, desc="reward_model", unit="step")
  t0, results = time.time(), {}
  last_log = (start, time.time())
  stop = loop.StopSignal()
  for step in range(start, config.steps):
    state, m = train_step(state, jax.tree.map(jnp.asarray, source.batch(step)))
    done = step + 1
    if done % config.log_every == 0 or done == config.steps:
      m = jax.device_get(m)
      loop.check_finite(float(m["loss"]), f"reward_model loss at step {done}", ckpt, workdir)
      loop.check_diverged(float(m["param_norm"]), start_norm, config.max_param_norm_ratio,
                          f"reward_model step {done}", ckpt, workdir)
      now = time.time()
      m["pairs_per_sec"] = config.batch_size * (done - last_log[0]) / (now - last_log[1])
      last_log = (done, now)
      writer.write_scalars(done, {f"train/{k}": float(v) for k, v in m.items()})
      bar.update(done, loss=float(m["loss"]))
    if loop.due(done, config.eval_every, config.steps):
      results = evaluate(state.params, done)
    loop.end_of_step(stop, done, config.steps, config.ckpt_every,
                     lambda: ckpt.save(done, state, {"history": history}), writer, workdir)
  stop.close()
  bar.close()
  ckpt.close()

  # ---------------------------------------------------------------- export
  final = jax.device_get(state.params)
  if config.eval_every and not results:  # a rerun of a finished run: measure again
    results, report = evaluate_sets(score_fn, final, eval_sets, config.eval_bins)
  out = {"final": results, "by_category": report, "history": history,
         "loss": config.loss, "data": config.data,
         "train_seconds_this_run": round(time.time() - t0, 1)}
  if jax.process_index() != 0:
    return out
  meta = rm.meta_for(lm_config, pooling, config.max_len, command=pretrained.invocation(),
                     steps=config.steps, results=results, loss=config.loss, data=config.data,
                     **init_info)
  pretrained.export_bundle(rm.BUNDLE, final, meta, workdir, config.export_dir)
  paths.write_text(f"{workdir}/report.md", report_markdown(results, report))
  loop.write_results(workdir, out)
  writer.flush()
  return out
