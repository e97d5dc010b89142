"""Train a reward model from preference pairs and / or ratings (trainer `reward_model`).

Sections: data -> model -> optimizer / state -> checkpoint / resume -> update step ->
evaluation -> loop -> export.

* **Data** (rft.reward_models.data): the arithmetic world's pairs (correct vs near-miss
  answer, ties, label noise, Llama-2 margins) and ratings, generated per step as a
  function of (seed, step); or the pairs / ratings of jsonl / parquet files
  (`config.pair_file`, `config.rating_file`), sampled per step the same way; or
  (`config.data="shapes"`, rft.reward_models.shapes_data) ShapesWorld renders ranked by
  ground truth: a satisfying scene against the same scene edited to violate its caption,
  augmented as the attribute scorers are (`config.aug_noise`).
* **Model**: text data gets a scalar head on the arithmetic LM's last hidden state
  (rft.reward_models.model; last token or mean), initialised from the shipped
  arithmetic base (`config.init="base"`, `config.base_dir`) or at random
  (`config.init="random"`, `config.model`). ShapesWorld data gets a caption-conditioned
  image scorer trained from scratch (rft.reward_models.image_model, `config.image_model`).
  A model's inputs are a pair of arrays: (tokens, mask) or (images, caption tokens).
* **Loss** (rft.reward_models.losses), `config.loss`: "bt" (Bradley–Terry with margins
  and ties), "regression" (MSE on ratings) or "both" (bt_weight * BT +
  regression_weight * MSE).
* **Evaluation** on fixed clean pairs (no label noise) of the training and held-out
  problems (files: rows; generated worlds judge a regression model on pairs too):
  pairwise accuracy, expected calibration error of
  σ(r_c - r_r), the mean reward gap, accuracy by category (report.md, a RewardBench-style
  table) and, with ratings, the rating MSE and correlation.
* **Export**: `<workdir>/reward_model.{msgpack,json}`, loaded by the reward
  "lm_reward_model" (rft.rewards.reward_model) and by rft.reward_models.model.load;
  ShapesWorld: `<workdir>/shapes_rm.{msgpack,json}`, loaded by the reward
  "shapes_preference" and by rft.reward_models.image_model.load.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rft import checkpoint, metrics, paths, pretrained
from rft import config as config_lib
from rft.data import shapes
from rft.data.arithmetic import ArithmeticWorld, CharTokenizer
from rft.models import lm
from rft.reward_models import data, image_model, losses, shapes_data
from rft.reward_models import model as rm
from rft.train import loop, scorers
from rft.train.state import TrainState, lr_schedule, make_optimizer

LOSSES = ("bt", "regression", "both")
DATA = ("arithmetic", "file", "shapes")
EVAL_LINE = (("pair accuracy", "pair_accuracy", "%"), ("ECE", "ece", "f"),
             ("rating MSE", "rating_mse", "f"))


def check_config(config) -> None:
  """ValueError naming the key for values outside what the trainer takes (and for a
  required key still unset, e.g. :file's pair_file)."""
  config_lib.check_required(config)
  bad = []
  if config.loss not in LOSSES:
    bad.append(f"config.loss={config.loss!r} (use one of {LOSSES})")
  if config.data not in DATA:
    bad.append(f"config.data={config.data!r} (use one of {DATA})")
  if config.data == "shapes" and config.margin != "none":
    bad.append(f"config.margin={config.margin!r}: ShapesWorld pairs have no margins "
               "(use 'none')")
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
  """Training batches as a function of the step, and fixed clean evaluation sets.

  A batch holds each side of a pair, and each rated response, as the model's pair of
  input arrays: "chosen" / "rejected" / "rated" = (tokens, mask) for text, (images,
  caption tokens) for ShapesWorld."""

  def __init__(self, config):
    self.config = c = config
    self.uses_pairs = c.loss in ("bt", "both")
    self.uses_ratings = c.loss in ("regression", "both")
    if c.data == "shapes":
      self.world = shapes.ShapesWorld(c.holdout_fraction, c.split_seed)
      self.split_ids = self.world.split_ids
      self.tokenizer = shapes.tokenizer()
      self.caption_tokens = self.tokenizer.encode(self.world.texts)
      self._augment = jax.jit(scorers.augment, static_argnames=("noise",))
      return
    self.tokenizer = CharTokenizer()
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

  def _encode(self, rows, rng=None, augment_key=None):
    """The model inputs of rows: ((chosen), (rejected)) for pairs, (rated) for ratings.
    ShapesWorld scenes are rendered with `rng` and augmented when `augment_key` is given."""
    if self.config.data == "shapes":
      def images(cells, i):
        x = shapes.render_np(cells, rng)
        if augment_key is not None and self.config.aug_noise > 0:
          x = np.asarray(self._augment(jax.random.fold_in(augment_key, i), x,
                                       noise=float(self.config.aug_noise)))
        return x
      toks = self.caption_tokens[rows.ids]
      if isinstance(rows, shapes_data.ShapesPairs):
        return (images(rows.chosen, 0), toks), (images(rows.rejected, 1), toks)
      return images(rows.cells, 2), toks
    if isinstance(rows, data.Pairs):
      return (data.encode(self.tokenizer, rows.prompts, rows.chosen, self.config.max_len,
                          rows.where),
              data.encode(self.tokenizer, rows.prompts, rows.rejected, self.config.max_len,
                          rows.where))
    return data.encode(self.tokenizer, rows.prompts, rows.responses, self.config.max_len,
                       rows.where)

  def pairs(self, split: str, n: int, rng, clean: bool):
    c = self.config
    noise = 0.0 if clean else c.label_noise
    if c.data == "shapes":
      return shapes_data.shapes_pairs(self.world, self.world.sample_prompt_ids(rng, n, split),
                                      rng, label_noise=noise, tie_fraction=c.tie_fraction)
    if c.data == "arithmetic":
      ids = self.world.sample_ids(split, n, rng)
      return data.arithmetic_pairs(self.world, ids, rng, label_noise=noise,
                                   tie_fraction=c.tie_fraction, margin=c.margin,
                                   min_offset=c.min_offset, max_offset=c.max_offset)
    rows, ids = self.files["pairs"]
    return _flip(rows.take(rng.choice(ids[split], n)), noise, rng)

  def ratings(self, split: str, n: int, rng, clean: bool):
    c = self.config
    noise = 0.0 if clean else c.label_noise
    if c.data == "shapes":
      return shapes_data.shapes_ratings(self.world,
                                        self.world.sample_prompt_ids(rng, n, split), rng,
                                        label_noise=noise, wrong_fraction=c.wrong_fraction)
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
    if self.config.data != "file":
      return ["train", "heldout"]
    return [s for s in ("train", "heldout") if len(self.files[kind][1][s])]

  def batch(self, step: int) -> dict:
    c = self.config
    rng = np.random.default_rng([c.seed, step])
    aug = jax.random.fold_in(jax.random.key(c.seed), step) if c.data == "shapes" else None
    out = {}
    if self.uses_pairs:
      p = self.pairs("train", c.batch_size, rng, clean=False)
      out["chosen"], out["rejected"] = self._encode(p, rng, aug)
      out.update(label=p.label, margin=p.margin)
    if self.uses_ratings:
      r = self.ratings("train", c.rating_batch_size, rng, clean=False)
      out.update(rated=self._encode(r, rng, None if aug is None else jax.random.fold_in(aug, 1)),
                 rating=r.rating)
    return out

  def eval_sets(self) -> dict:
    """{(kind, split): (rows, encoded)}: fixed, clean (no label noise) sets. Generated
    worlds: `eval_pairs` drawn per split with `eval_seed` (ShapesWorld renders are not
    augmented), pairs also for a regression model; files: every row of the split (at
    most `eval_pairs`, the first ones)."""
    c = self.config
    out = {}
    # Generated worlds are judged on pairs whatever the loss (a regression model too).
    pairs = self.uses_pairs or c.data != "file"
    for kind, used in (("pairs", pairs), ("ratings", self.uses_ratings)):
      if not used:
        continue
      for split in self.splits(kind):
        rng = np.random.default_rng([c.eval_seed, 3, ["train", "heldout"].index(split)])
        if c.data != "file":
          make = self.pairs if kind == "pairs" else self.ratings
          rows = make(split, c.eval_pairs, rng, clean=True)
        else:
          all_rows, ids = self.files[kind]
          rows = all_rows.take(ids[split][:c.eval_pairs])
        out[(kind, split)] = (rows, self._encode(rows, rng))
    return out


# ------------------------------------------------------------------ model

def build_model(config, workdir: str, tokenizer):
  """(score(params, a, b) -> [N] on a pair of input arrays, initial params, what the
  model was initialised from, bundle (name, meta) for the export)."""
  key = jax.random.key(config.seed)
  if config.data == "shapes":
    model = image_model.make_model(tokenizer.vocab_size, shapes.MAX_CAPTION_WORDS,
                                   **dict(config.image_model))
    score = lambda p, images, tokens: model.apply({"params": p}, images, tokens)
    meta = {"model": image_model.model_config(model)}
    return score, image_model.init_params(model, key), {"init": "random"}, (
        image_model.BUNDLE, meta)
  pooling = config.pooling
  if config.init == "base":
    from rft.train.pretrain_lm import load_or_pretrain_arith  # pylint: disable=g-import-not-at-top
    lm_config, base, meta = load_or_pretrain_arith(workdir, config.base_dir or None)
    if lm_config.vocab_size != tokenizer.vocab_size:
      raise ValueError(f"config.base_dir={config.base_dir!r}: the base LM's vocabulary has "
                       f"{lm_config.vocab_size} ids, the arithmetic tokenizer "
                       f"{tokenizer.vocab_size}")
    params = rm.init_params(lm_config, pooling, key, base)
    info = {"init": "base", "base_dir": config.base_dir or "assets",
            "base_command": meta.get("command", "")}
  else:
    lm_config = lm.LMConfig(vocab_size=tokenizer.vocab_size,
                            max_position_embeddings=config.max_len, **dict(config.model))
    params, info = rm.init_params(lm_config, pooling, key), {"init": "random"}
  score = lambda p, t, m: rm.scores(lm_config, pooling, p, t, m)
  return score, params, info, (rm.BUNDLE, rm.meta_for(lm_config, pooling, config.max_len))


# ------------------------------------------------------------------ evaluation

def score_inputs(score_fn, params, inputs, batch: int = 512) -> np.ndarray:
  """Scores [N] of a model's input arrays (a pair: (tokens, mask) or (images, tokens)), in
  chunks of `batch` padded to a multiple of 8 (a few batch shapes: few compiles)."""
  out = []
  for s in range(0, len(inputs[0]), batch):
    chunk = [x[s:s + batch] for x in inputs]
    n, pad = len(chunk[0]), (-len(chunk[0])) % 8
    if pad:
      chunk = [np.concatenate([x, x[-1:].repeat(pad, 0)]) for x in chunk]
    out.append(np.asarray(score_fn(params, *chunk))[:n])
  return np.concatenate(out)


def evaluate_sets(score_fn, params, sets: dict, bins: int, batch: int = 512) -> tuple[dict, dict]:
  """(scalar metrics {"<split>/<name>": value}, per-category report {split: {...}})."""
  rewards = lambda inputs: score_inputs(score_fn, params, inputs, batch)

  scalars, report = {}, {}
  for (kind, split), (rows, enc) in sets.items():
    if kind == "pairs":
      rc, rr = rewards(enc[0]), rewards(enc[1])
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
      r = rewards(enc)
      scalars[f"{split}/rating_mse"] = float(losses.regression_loss(r, rows.rating))
      if np.std(r) > 0 and np.std(rows.rating) > 0:
        scalars[f"{split}/rating_corr"] = float(np.corrcoef(r, rows.rating)[0, 1])
  return scalars, report


def reference_score_stats(score_fn, params, sets: dict, batch: int = 512) -> dict:
  """{"mean", "std", "n", "on"} of the model's scores on both sides of the clean held-out
  evaluation pairs (the training split's when none are held out): the reference a
  standardised reward, (r − mean) / std, is measured against. A Bradley–Terry model is
  defined up to an offset, so members of an ensemble trained from different seeds score
  on different offsets until standardised."""
  split = "heldout" if ("pairs", "heldout") in sets else "train"
  if ("pairs", split) not in sets:
    raise ValueError("reference_score_stats needs evaluation pairs (a generated world, or "
                     "config.pair_file)")
  _, enc = sets[("pairs", split)]
  r = np.concatenate([score_inputs(score_fn, params, side, batch)
                      for side in enc]).astype(np.float64)
  return {"mean": float(r.mean()), "std": float(r.std()), "n": int(r.size),
          "on": f"both sides of the clean {split} evaluation pairs"}


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
  score, params, init_info, (bundle, bundle_meta) = build_model(config, workdir,
                                                                source.tokenizer)
  logging.info("reward model %s: %d params (%s init), loss %s", bundle,
               sum(x.size for x in jax.tree.leaves(params)), init_info["init"], config.loss)
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
  use_bt, use_reg = source.uses_pairs, source.uses_ratings

  def loss_fn(p, b):
    m, bt, reg = {}, 0.0, 0.0
    if use_bt:
      n = b["label"].shape[0]
      r = score(p, *(jnp.concatenate([c, j]) for c, j in zip(b["chosen"], b["rejected"])))
      rc, rr = r[:n], r[n:]
      bt = losses.bradley_terry_loss(rc, rr, b["margin"], b["label"])
      strict = (b["label"] > 0.5).astype(jnp.float32)
      m["bt_loss"] = bt
      m["pair_accuracy"] = jnp.sum((rc > rr) * strict) / jnp.maximum(jnp.sum(strict), 1)
    if use_reg:
      reg = losses.regression_loss(score(p, *b["rated"]), b["rating"])
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
  meta = dict(bundle_meta, command=pretrained.invocation(), steps=config.steps,
              results=results, loss=config.loss, data=config.data, **init_info)
  if any(kind == "pairs" for kind, _ in eval_sets):
    meta["score_stats"] = reference_score_stats(score_fn, final, eval_sets)
  pretrained.export_bundle(bundle, final, meta, workdir, config.export_dir)
  paths.write_text(f"{workdir}/report.md", report_markdown(results, report))
  loop.write_results(workdir, out)
  writer.flush()
  return out
