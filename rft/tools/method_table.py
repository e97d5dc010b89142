"""Print the README's method table from finished runs' results.json files.

  python -m rft.tools.method_table workdirs/table/prdp workdirs/table/ddpo ...

Online runs (rft.train.diffusion_rl) give base (epoch 0) and final evaluations; ReNO runs
(rft.train.reno) give initial / best per split. Columns: reward, evaluator alignment on training and held-out prompts, reward queries,
wall time. The reward column is the reward model's P(caption) averaged over the 256
fixed training-split evaluation prompts (the default `shapes_alignment` reward).
"""
from __future__ import annotations

import os
import sys

from rft import paths


def _pct(x):
  return f"{100 * x:.1f} %"


def rows(workdir: str, with_base: bool = True) -> list[str]:
  r = paths.read_json(os.path.join(workdir, "results.json"))
  name = os.path.basename(os.path.normpath(workdir))
  if "history" in r:  # online loop
    hist = r["history"]
    first, last = hist["0"], hist[max(hist, key=int)]
    base = [f"| base model (epoch 0 of {name}) | {first['train/reward']:.3f} | "
            f"{_pct(first['train/alignment'])} | {_pct(first['heldout/alignment'])} | 0 | – |"]
    return (base if with_base else []) + [
        f"| **{name}** ({max(hist, key=int)} epochs) | {last['train/reward']:.3f} | "
        f"{_pct(last['train/alignment'])} | {_pct(last['heldout/alignment'])} | "
        f"{r['reward_queries']:,} | {r['total_seconds_this_run'] / 60:.1f} min |"]
  tr, ho = r["train"], r["heldout"]  # ReNO
  # P(caption) under the reward model: the online runs' default reward, whatever ReNO optimised.
  return [f"| **{name}** (inference time, best iterate; 32 prompts per split) | "
          f"{tr['p_caption_best']:.3f} (from {tr['p_caption_initial']:.3f}) | "
          f"{_pct(tr['alignment_best'])} (from {_pct(tr['alignment_initial'])}) | "
          f"{_pct(ho['alignment_best'])} (from {_pct(ho['alignment_initial'])}) | "
          f"{r['reward_queries']:,} | {r['wall_seconds'] / 60:.1f} min |"]


def main(workdirs: list[str]) -> None:
  print("| run | reward (train prompts) | alignment (train) | alignment (held-out) | "
        "reward queries | wall time |")
  print("|---|---|---|---|---|---|")
  for i, w in enumerate(workdirs):  # the base row once: every online run starts from it
    for line in rows(w, with_base=i == 0):
      print(line)


if __name__ == "__main__":
  main(sys.argv[1:])
