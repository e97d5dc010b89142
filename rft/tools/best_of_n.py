"""Best-of-N reranking: does a reward pick the right sample, and does picking by it
overoptimize?

**Arithmetic** (`--world arith`, default): samples N completions per problem from an
arithmetic LM (the shipped base by default) at `--temperature`, scores them with
`--reward` (any registered text reward: "lm_confidence" (CRew), "lm_reward_model" with
`--reward_options '{"lm_reward_model": {"path": DIR}}'`, "lm_judge", ...) and prints the
exact-match accuracy of one sample, of the best of N by the reward, of majority vote and
of the oracle (pass@N), over `--seeds` sampling seeds with a 95 % t interval, plus best
of N minus majority vote paired by seed:

  python -m rft.tools.best_of_n --reward lm_confidence --n 8 --problems 256 --seeds 3

**ShapesWorld** (`--world shapes`): N images per caption from a ShapesWorld base (the RL
sampler: 10 DDIM steps, eta 1), scored by `--reward` (default the learned
"shapes_alignment"); for n = 1, 2, 4, ..., N the best of n by the reward is judged by the
independent evaluator. Reward of the pick rising while the evaluator's alignment of the
pick stalls or falls is reward overoptimization (rft.rewards.rerank.best_of_n_curve):

  python -m rft.tools.best_of_n --world shapes --n 32 --problems 32 --seeds 3 \
      --base_dir assets/positions

`--json PATH` also writes the per-seed and pooled numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from scipy import stats as stats_lib

from rft import pretrained
from rft.data.arithmetic import ArithmeticWorld
from rft.repro import stats
from rft.rewards import base as rewards_base
from rft.rewards import rerank
from rft.worlds import arith_eval

KEYS = ("one_sample", "mean_sample", "majority_vote", "best_of_n", "oracle")


def run_seed(lm_config, params, world, reward, *, n: int, problems: int, split: str,
             temperature: float, seed: int) -> dict:
  """One seed: N samples of `problems` problems of `split`, reranked by `reward`."""
  ids = world.eval_ids(split, problems, seed=0)  # the same problems for every seed
  rep = np.repeat(ids, n)
  texts = arith_eval.generate_texts(lm_config, params, world, rep, jax.random.key(seed),
                                    temperature=temperature)
  answers = [world.answers[i] for i in rep]
  correct = np.asarray([float(t == a) for t, a in zip(texts, answers)])
  scores = np.asarray(reward(texts, {"answers": answers,
                                     "prompts": [world.prompts[i] for i in rep]}), np.float64)
  out = rerank.rerank_table(scores, correct, n, answers=texts)
  out["reward_auc"] = auc(scores, correct)
  return out


def auc(scores, labels) -> float:
  """P(score of a correct sample > score of a wrong one), ties half (NaN if one class)."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels) > 0
  pos, neg = s[y], s[~y]
  if not len(pos) or not len(neg):
    return float("nan")
  # Mann-Whitney U with average ranks for ties.
  r = stats_lib.rankdata(np.concatenate([pos, neg]))
  u = r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
  return float(u / (len(pos) * len(neg)))


def summarize(per_seed: list[dict]) -> dict:
  """Mean and 95 % t interval of each accuracy over seeds, and best-of-N minus majority
  vote and minus one sample, paired by seed."""
  out = {}
  for k in KEYS + ("reward_auc",):
    vals = [r[k] for r in per_seed if k in r]
    if vals:
      out[k] = stats.interval(vals)
  for other in ("majority_vote", "mean_sample"):
    diffs = [r["best_of_n"] - r[other] for r in per_seed if other in r]
    out[f"best_of_n_minus_{other}"] = stats.interval(diffs)
  return out


def shapes_seed(s, a, reward, seed: int) -> dict:
  """One seed of the ShapesWorld curve on `s` (a headroom.Setup): {n: {"reward", "gold"}}
  plus the oracle."""
  ids = np.repeat(s.ids, a.n)
  images, aligned = [], []
  sample = s.sampler()
  for i, start in enumerate(range(0, len(ids), 256)):
    chunk = ids[start:start + 256]
    im = sample(s.params, s.tokens[chunk], jax.random.fold_in(jax.random.key(seed), i))
    images.append(np.asarray(im))
    aligned.append(np.asarray(jax.device_get(s.judge(im, s.world.assignments(chunk)))["aligned"]))
  images, aligned = np.concatenate(images), np.concatenate(aligned).astype(np.float64)
  prompts = {"ids": ids, "tokens": s.tokens[ids], "assignments": s.world.assignments(ids)}
  score = reward if reward.host else jax.jit(lambda im, p: reward(im, p))
  scores = np.asarray(score(images, prompts), np.float64)
  ns = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= a.n and a.n % k == 0]
  curve = rerank.best_of_n_curve(scores.reshape(-1, a.n), aligned.reshape(-1, a.n), ns)
  return {"curve": {str(k): v for k, v in curve.items()},
          "oracle": float(aligned.reshape(-1, a.n).max(axis=1).mean()),
          "reward_auc": auc(scores, aligned)}


def summarize_curves(per_seed: list[dict]) -> dict:
  """Mean and 95 % interval over seeds of each n's reward and gold, and of the gold gain
  from n = 1 to each n (paired by seed)."""
  ns = list(per_seed[0]["curve"])
  out = {}
  for n in ns:
    out[n] = {k: stats.interval([r["curve"][n][k] for r in per_seed]) for k in ("reward", "gold")}
    out[n]["gold_gain"] = stats.interval([r["curve"][n]["gold"] - r["curve"][ns[0]]["gold"]
                                          for r in per_seed])
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--world", default="arith", choices=("arith", "shapes"))
  ap.add_argument("--reward", default="", help="a reward spec (default: lm_confidence for "
                  "arith, shapes_alignment for shapes)")
  ap.add_argument("--reward_options", default="{}", help="JSON {reward name: {option: value}}")
  ap.add_argument("--base_dir", default="", help="base model bundle folder (default shipped)")
  ap.add_argument("--n", type=int, default=8, help="samples per prompt")
  ap.add_argument("--problems", type=int, default=256, help="problems / captions")
  ap.add_argument("--split", default="", choices=("", "train", "heldout"),
                  help="default: heldout for arith, train (T1's captions) for shapes")
  ap.add_argument("--temperature", type=float, default=1.0, help="arith sampling temperature")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  try:
    options = json.loads(a.reward_options)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--reward_options is not JSON: {e}") from None
  a.reward = a.reward or ("lm_confidence" if a.world == "arith" else "shapes_alignment")
  a.split = a.split or ("heldout" if a.world == "arith" else "train")
  reward = rewards_base.build(a.reward, options=options)
  t0 = time.time()
  if a.world == "shapes":
    from rft.tools.headroom import Setup  # pylint: disable=g-import-not-at-top
    setup = Setup(a.base_dir or None, a.problems)
    if a.split == "heldout":
      setup.ids = setup.world.eval_prompt_ids("heldout", a.problems, seed=0)
    setup.tokens = np.asarray(setup.tokens)
    per_seed = [shapes_seed(setup, a, reward, k) for k in range(a.seeds)]
    curves = summarize_curves(per_seed)
    print(f"best-of-n by {a.reward} on {a.problems} {a.split} captions, judged by the "
          f"evaluator, {a.seeds} seeds ({time.time() - t0:.0f} s); mean [95 % interval]:")
    print(f"  {'n':>4s}  {'reward of the pick':24s}  {'evaluator alignment %':24s}  gain vs n=1")
    for n, v in curves.items():
      print(f"  {n:>4s}  {v['reward'].fmt(digits=3):24s}  {v['gold'].fmt(scale=100):24s}  "
            f"{v['gold_gain'].fmt(scale=100)}")
    oracle = stats.interval([r["oracle"] for r in per_seed])
    print(f"  oracle (any of {a.n} aligned): {oracle.fmt(scale=100)} %; reward AUROC against "
          f"the evaluator: {stats.interval([r['reward_auc'] for r in per_seed]).fmt(digits=3)}")
    summary = {n: {k: dataclasses.asdict(iv) for k, iv in v.items()} for n, v in curves.items()}
  else:
    lm_config, params, meta = pretrained.load_arith_base(
        pretrained.resolve_dir(a.base_dir or None))
    world = ArithmeticWorld(**meta["world"])
    per_seed = [run_seed(lm_config, params, world, reward, n=a.n, problems=a.problems,
                         split=a.split, temperature=a.temperature, seed=s)
                for s in range(a.seeds)]
    table = summarize(per_seed)
    print(f"best-of-{a.n} by {a.reward} on {a.problems} {a.split} problems, temperature "
          f"{a.temperature}, {a.seeds} seeds ({time.time() - t0:.0f} s); exact-match accuracy "
          f"in %, mean [95 % interval]:")
    for k, v in table.items():
      print(f"  {k:32s} {v.fmt(scale=100)}")
    summary = {k: dataclasses.asdict(v) for k, v in table.items()}
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"args": vars(a), "per_seed": per_seed, "summary": summary}, f, indent=1)


if __name__ == "__main__":
  main()
