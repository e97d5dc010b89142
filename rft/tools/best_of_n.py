"""Best-of-N reranking on the arithmetic world: does a reward pick the right answer?

Samples N completions per problem from an arithmetic LM (the shipped base by default) at
temperature `--temperature`, scores them with `--reward` (any registered text reward, e.g.
"lm_confidence" (CRew), "lm_reward_model" with `--reward_options
'{"lm_reward_model": {"path": DIR}}'`, "lm_judge"), and prints the exact-match accuracy of
one sample, of the best of N by the reward, of majority vote and of the oracle (pass@N),
over `--seeds` sampling seeds with a 95 % t interval, plus best-of-N minus majority vote
paired by seed:

  python -m rft.tools.best_of_n --reward lm_confidence --n 8 --problems 256 --seeds 3

`--json PATH` also writes the per-seed and pooled numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

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
  allv = np.concatenate([pos, neg])
  order = np.argsort(allv, kind="stable")
  r = np.empty(len(allv))
  sv = allv[order]
  i = 0
  while i < len(sv):
    j = i
    while j + 1 < len(sv) and sv[j + 1] == sv[i]:
      j += 1
    r[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reward", default="lm_confidence", help="a text reward spec")
  ap.add_argument("--reward_options", default="{}", help="JSON {reward name: {option: value}}")
  ap.add_argument("--base_dir", default="", help="arithmetic LM bundle folder (default shipped)")
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--problems", type=int, default=256)
  ap.add_argument("--split", default="heldout", choices=("train", "heldout"))
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  try:
    options = json.loads(a.reward_options)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--reward_options is not JSON: {e}") from None
  lm_config, params, meta = pretrained.load_arith_base(pretrained.resolve_dir(a.base_dir or None))
  world = ArithmeticWorld(**meta["world"])
  reward = rewards_base.build(a.reward, options=options)
  t0 = time.time()
  per_seed = [run_seed(lm_config, params, world, reward, n=a.n, problems=a.problems,
                       split=a.split, temperature=a.temperature, seed=s)
              for s in range(a.seeds)]
  summary = summarize(per_seed)
  print(f"best-of-{a.n} by {a.reward} on {a.problems} {a.split} problems, temperature "
        f"{a.temperature}, {a.seeds} seeds ({time.time() - t0:.0f} s); exact-match accuracy "
        f"in %, mean [95 % interval]:")
  for k, v in summary.items():
    print(f"  {k:32s} {v.fmt(scale=100)}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"args": vars(a), "per_seed": per_seed,
                 "summary": {k: dataclasses.asdict(v) for k, v in summary.items()}}, f, indent=1)


if __name__ == "__main__":
  main()
