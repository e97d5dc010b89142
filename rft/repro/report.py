"""A table's outputs from its finished runs: table.md, table.csv, curves.png, grids, verdicts.

* table.csv: one line per (row, metric, statistic) with the mean, the 95 % interval over
  seeds, the per-seed values (statistic: base, final, gain) and the seeds they belong to.
* records/<row>/seed<k>.json: each finished run's command and results (rft.repro.runner),
  from which the table can be re-reported and extended without the run folders.
* table.md: the table (base row, then each method's final value and gain, "mean [low,
  high]"), each claim with its verdict and interval, the commands and the budget.
* curves.png: the curve metric against reward queries, one line (mean over seeds) and
  band (min..max over seeds) per method.
* grids/<row>.png: seed 0's evaluation samples before (epoch 0) and after finetuning.
The output folder and the run folders may be local or not (gs://...: rft.paths).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex

import numpy as np

from rft import paths
from rft.repro import stats
from rft.repro import tables as tables_lib
from rft.repro import runner
from rft.repro.runner import Run


def shell_command(argv) -> str:
  """`python -m rft.main ...` as a shell line: config paths inside the repository made
  relative to it, every argument quoted where the shell would split or expand it."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = []
  for a in argv:
    if a.startswith("--config=") and a[len("--config="):].startswith(root + os.sep):
      a = "--config=" + os.path.relpath(a[len("--config="):], root)
    args.append(shlex.quote(a))
  return "python -m rft.main " + " ".join(args)


def _value(results: dict, key: str, which: str) -> float | None:
  """A metric of one run: `which` = base (epoch 0), final (last evaluation) or gain."""
  hist = results.get("history", {})
  if key == "max_kl":
    kl = [c.get("kl_to_ref") for c in results.get("curve", {}).values()]
    kl = [k for k in kl if k is not None]
    if which == "base":
      return 0.0
    return max(kl) if kl else None
  if not hist:
    return None
  first, last = hist.get("0", {}), hist[max(hist, key=int)]
  if which == "base":
    return first.get(key)
  if which == "final":
    return last.get(key)
  if key in first and key in last:
    return last[key] - first[key]
  return None


def queries_to_reach(results: dict, key: str, gain: float) -> tuple[int, float] | None:
  """(reward queries, training seconds) at the first evaluation whose `key` is at least
  `gain` above the epoch-0 value; None: never within the run. The seconds sum the
  per-epoch times of the curve up to that epoch (compilation in the first, evaluations
  not counted)."""
  hist = results.get("history", {})
  base = hist.get("0", {}).get(key)
  per_epoch = results.get("samples_per_epoch")
  if base is None or not per_epoch:
    return None
  for epoch in sorted(hist, key=int):
    v = hist[epoch].get(key)
    if v is not None and v - base >= gain - 1e-9:
      curve = results.get("curve", {})
      seconds = sum(float(c.get("epoch_seconds", c.get("step_seconds", 0.0)))
                    for e, c in curve.items()
                    if int(e) <= int(epoch))
      return int(epoch) * int(per_epoch), seconds
  return None


def collect(metrics: tuple[tables_lib.Metric, ...], runs: list[Run]) -> dict:
  """{row: {metric: {base|final|gain: Interval, "seeds": {...}}}, "_runs": ...} of the
  finished runs."""
  out: dict = {}
  for row in dict.fromkeys(r.row for r in runs):
    done = [r for r in runs if r.row == row and r.done]
    res = [r.results() for r in done]
    per = {}
    for m in metrics:
      entry = {}
      for which in ("base", "final", "gain"):
        vals = [_value(x, m.key, which) for x in res]
        entry[which] = stats.interval([v for v in vals if v is not None])
        entry[f"{which}_values"] = vals
      per[m.key] = entry
    per["_seeds"] = [r.seed for r in done]
    per["_queries"] = [x.get("reward_queries") for x in res]
    # wall_seconds: ReNO's; train_seconds_this_run: the reward-model trainer's
    per["_minutes"] = [next((x[k] for k in ("total_seconds", "total_seconds_this_run",
                                            "wall_seconds", "train_seconds_this_run")
                             if k in x), 0) / 60 for x in res]
    out[row] = per
  return out


def claim_interval(claim: tables_lib.Claim, runs: list[Run]) -> stats.Interval:
  """Interval of a's metric (gain or final) minus b's, paired by seed."""
  by = {}
  for r in runs:
    if r.done and r.row in (claim.a, claim.b):
      by.setdefault(r.seed, {})[r.row] = _value(r.results(), claim.metric, claim.on)
  diffs = []
  for seed, v in sorted(by.items()):
    a = v.get(claim.a)
    if a is None:
      continue
    if claim.b is None:
      diffs.append(a)
    elif v.get(claim.b) is not None:
      diffs.append(a - v[claim.b])
  return stats.interval(diffs)


def verdicts(table: tables_lib.Table, preset_name: str, runs: list[Run]) -> list[dict]:
  out = []
  for c in table.claims_of(preset_name):
    iv = claim_interval(c, runs)
    out.append({"claim": c.text, "verdict": stats.verdict(c.kind, iv, c.margin),
                "interval": iv, "metric": c.metric, "on": c.on})
  return out


def _fmt(iv: stats.Interval, metric: tables_lib.Metric, signed: bool = False) -> str:
  if iv.n == 0:
    return "–"
  scale, digits = (100.0, 1) if metric.percent else (1.0, 3)
  s = iv.fmt(scale, digits)
  return ("+" + s if signed and iv.mean >= 0 else s)


def write(table: tables_lib.Table, preset_name: str, runs: list[Run], out_dir: str,
          hardware: str = "") -> dict:
  """Writes table.md, table.csv, curves.png and grids/ into out_dir; returns the summary."""
  paths.makedirs(out_dir)
  runner.keep_records(runs)
  metrics = table.metrics_of(preset_name)
  data = collect(metrics, runs)
  ver = verdicts(table, preset_name, runs)
  preset = table.preset(preset_name)
  # ------------------------------------------------------------------ csv
  with io.StringIO(newline="") as f:
    w = csv.writer(f)
    w.writerow(["table", "preset", "row", "metric", "statistic", "mean", "ci95_low",
                "ci95_high", "seeds", "values", "seed_ids"])
    for row, per in data.items():
      for m in metrics:
        for which in ("base", "final", "gain"):
          iv = per[m.key][which]
          w.writerow([table.name, preset_name, row, m.key, which, iv.mean, iv.low, iv.high,
                      iv.n, json.dumps(per[m.key][f"{which}_values"]),
                      json.dumps(per["_seeds"])])
    paths.write_text(os.path.join(out_dir, "table.csv"), f.getvalue())
  # ------------------------------------------------------------------ markdown
  lines = [f"# {table.title}", "", f"Paper: {table.paper}", "",
           f"Preset `{preset_name}`: {preset.note}." + (f" Hardware: {hardware}." if hardware
                                                       else ""), ""]
  head = ["method"] + [f"{m.label}: after (gain)" for m in metrics] + [
      "seeds", "reward queries", "minutes per run"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  first = next(iter(data.values()), None)
  if first is not None:
    lines.append("| base model | " + " | ".join(_fmt(first[m.key]["base"], m)
                                                  for m in metrics) + " | | 0 | |")
  for row, per in data.items():
    label = table.row(row).label
    cells = [f"{_fmt(per[m.key]['final'], m)} ({_fmt(per[m.key]['gain'], m, signed=True)})"
             for m in metrics]
    q = [x for x in per["_queries"] if x]
    mins = per["_minutes"]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(per['_seeds'])} | "
                 + (f"{int(np.mean(q)):,}" if q else "–") + " | "
                 + (f"{np.mean(mins):.1f}" if mins and np.mean(mins) > 0 else "–") + " |")
  lines += ["", "Values: mean over seeds [95 % t interval]; percentages are points of "
            f"{table.percent_of}.", ""]
  if table.reach:
    key, gain = table.reach
    m = next((m for m in metrics if m.key == key), tables_lib.Metric(key, key))
    amount = f"+{gain * 100:g} points" if m.percent else f"+{gain:g}"
    lines += [f"Reward queries (and training minutes) until {m.label} first reaches "
              f"{amount} over its start (epoch or step 0), per seed, at the preset's "
              "evaluations:", "",
              "| method | per seed | seeds reaching it |", "|---|---|---|"]
    for row in data:
      done = [r for r in runs if r.row == row and r.done]
      got = [queries_to_reach(r.results(), key, gain) for r in done]
      shown = ", ".join("never" if q is None else f"{q[0]:,}" + (
          f" ({q[1] / 60:.1f} min)" if q[1] else "") for q in got)
      lines.append(f"| {table.row(row).label} | {shown} | "
                   f"{sum(q is not None for q in got)} of {len(got)} |")
    lines.append("")
  lines += ["| claim | verdict | interval (paired by seed) |", "|---|---|---|"]
  for v in ver:
    m = next((m for m in metrics if m.key == v["metric"]), None)
    iv = v["interval"]
    shown = _fmt(iv, m, signed=True) if m else iv.fmt()
    lines.append(f"| {v['claim']} | **{v['verdict']}** | {shown} |")
  lines += ["", "Commands (one per run, from the repository root):", ""]
  for r in runs:
    lines.append(f"* {r.row} seed {r.seed}: `{shell_command(r.argv)}`")
  paths.write_text(os.path.join(out_dir, "table.md"), "\n".join(lines) + "\n")
  # ------------------------------------------------------------------ plots
  curve = table.curve_metric_of(preset_name)
  pct = next((m.percent for m in metrics if m.key == curve), True)
  _curves(table, curve, 100.0 if pct else 1.0, runs, os.path.join(out_dir, "curves.png"))
  _grids(runs, os.path.join(out_dir, "grids"))
  summary = {"table": table.name, "preset": preset_name, "hardware": hardware,
             "verdicts": [dict(v, interval=vars(v["interval"])) for v in ver],
             "rows": {row: {m.key: {k: vars(per[m.key][k]) for k in ("base", "final", "gain")}
                            for m in metrics} for row, per in data.items()}}
  paths.write_json(os.path.join(out_dir, "summary.json"), summary, indent=1)
  return summary


def _curves(table: tables_lib.Table, metric: str, scale: float, runs: list[Run],
            path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  plotted = queried = False
  for row in dict.fromkeys(r.row for r in runs):
    series = []
    for r in runs:
      if r.row != row or not r.done:
        continue
      res = r.results()
      queried = queried or "reward_queries" in res
      # ReNO's history counts iterations and its results hold no epochs: the last key
      steps = res.get("epochs") or max(int(e) for e in res["history"])
      # reward queries on the x axis; a run that queries no reward (reward-model
      # training) is drawn against its steps
      per_epoch = res.get("samples_per_epoch") or (
          res["reward_queries"] / max(steps, 1) if "reward_queries" in res else 1)
      pts = sorted((int(e) * per_epoch, h[metric])
                   for e, h in res["history"].items() if metric in h)
      series.append(pts)
    if not series:
      continue
    xs = sorted({x for s in series for x, _ in s})
    ys = np.array([[dict(s).get(x, np.nan) for x in xs] for s in series], np.float64)
    mean = np.nanmean(ys, 0)
    ax.plot(xs, scale * mean, label=f"{table.row(row).label} ({len(series)} seeds)")
    ax.fill_between(xs, scale * np.nanmin(ys, 0), scale * np.nanmax(ys, 0), alpha=0.2)
    plotted = True
  ax.set_xlabel("reward queries" if queried else "training steps")
  ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
  ax.set_title(table.title, fontsize=9)
  if plotted:
    ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())


def _grids(runs: list[Run], out_dir: str) -> None:
  """Seed 0's before / after evaluation grids of every row, side by side."""
  from PIL import Image
  paths.makedirs(out_dir)
  for r in runs:
    if r.seed != min(x.seed for x in runs if x.row == r.row) or not r.done:
      continue
    samples = paths.path(r.workdir) / "samples"
    for split in ("train", "heldout"):
      made = paths.path(r.workdir) / f"{split}_before_after.png"  # ReNO's own grid
      if made.exists():
        paths.write_bytes(os.path.join(out_dir, f"{r.row}_{split}_before_after.png"),
                          made.read_bytes())
        continue
      if not samples.is_dir():
        continue
      files = sorted(f.name for f in samples.iterdir() if f.name.startswith(f"{split}_epoch"))
      if len(files) < 2:
        continue
      before, after = (Image.open(io.BytesIO((samples / f).read_bytes())).convert("RGB")
                       for f in (files[0], files[-1]))
      canvas = Image.new("RGB", (before.width + after.width + 8, max(before.height,
                                                                     after.height)), "white")
      canvas.paste(before, (0, 0))
      canvas.paste(after, (before.width + 8, 0))
      paths.write_png(os.path.join(out_dir, f"{r.row}_{split}_before_after.png"), canvas)
