"""Pooling the per-seed values of several reports of one table and preset.

`python -m rft.repro.pool DIR_OR_CSV [DIR_OR_CSV ...] --out DIR` reads each report's
table.csv (rft.repro.report: per row, metric and statistic the per-seed values and their
seeds), joins the seeds (a seed that two reports both hold is an error: the same run
counted twice), and writes the pooled table.md, table.csv and summary.json: every
interval and every claim's verdict (paired by seed, as in rft.repro.stats) over all
seeds. Reports written before table.csv named its seeds held seeds 0..n-1 of every row
(the harness then ran only `--seeds N`); they are read so, and the table says so.

This is how a table grows across machines or sessions when its run folders (and so its
records) are gone. Runs on different machines are statistically, not bitwise, alike
(XLA's CPU code differs by processor), which the pooled table states beside its sources.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os

from rft import paths
from rft.repro import stats
from rft.repro import tables as tables_lib

STATISTICS = ("base", "final", "gain")


def read_values(source: str) -> dict:
  """{"table", "preset", "assumed_seeds": bool, "values": {(row, metric, statistic):
  {seed: value}}} of a report folder or its table.csv."""
  path = os.path.join(source, "table.csv") if paths.path(source).is_dir() else source
  rows = list(csv.DictReader(io.StringIO(paths.path(path).read_text())))
  if not rows:
    raise ValueError(f"{path}: no rows")
  names = {(r["table"], r["preset"]) for r in rows}
  if len(names) != 1:
    raise ValueError(f"{path}: holds several tables or presets: {sorted(names)}")
  out, assumed = {}, False
  for line, r in enumerate(rows, start=2):
    values = json.loads(r["values"])
    if r.get("seed_ids"):
      seeds = json.loads(r["seed_ids"])
    else:
      seeds, assumed = list(range(len(values))), True
    if len(seeds) != len(values):
      raise ValueError(f"{path} line {line}: {len(values)} values for seeds {seeds}")
    out[(r["row"], r["metric"], r["statistic"])] = {
        int(s): (None if v is None else float(v)) for s, v in zip(seeds, values)}
  (table, preset), = names
  return {"table": table, "preset": preset, "assumed_seeds": assumed, "values": out,
          "path": path}


def pool(sources: list[str]) -> dict:
  """The reports' values joined by seed; all must be of one table and preset."""
  parts = [read_values(s) for s in sources]
  names = {(p["table"], p["preset"]) for p in parts}
  if len(names) != 1:
    raise ValueError(f"reports of different tables or presets: {sorted(names)} "
                     f"({', '.join(p['path'] for p in parts)})")
  values: dict = {}
  for p in parts:
    for key, by_seed in p["values"].items():
      have = values.setdefault(key, {})
      twice = sorted(set(have) & set(by_seed))
      if twice:
        raise ValueError(f"seed(s) {twice} of {key[0]} {key[1]} {key[2]} are in two "
                         f"reports (second: {p['path']}); pool distinct runs only")
      have.update(by_seed)
  (table, preset), = names
  return {"table": table, "preset": preset, "values": values, "sources": parts}


def claim_interval(claim: tables_lib.Claim, values: dict) -> stats.Interval:
  """a's metric (gain or final) minus b's, paired by seed (seeds where both exist)."""
  a = values.get((claim.a, claim.metric, claim.on), {})
  if claim.b is None:
    return stats.interval([a[s] for s in sorted(a)])
  b = values.get((claim.b, claim.metric, claim.on), {})
  return stats.interval([a[s] - b[s] for s in sorted(set(a) & set(b))
                         if a[s] is not None and b[s] is not None])


def write(pooled: dict, out_dir: str) -> dict:
  """table.md, table.csv and summary.json of the pooled values into out_dir."""
  table = tables_lib.get(pooled["table"])
  preset = pooled["preset"]
  metrics = table.metrics_of(preset)
  values = pooled["values"]
  rows = list(dict.fromkeys(k[0] for k in values))
  summary = {"table": table.name, "preset": preset,
             "sources": [{"path": p["path"], "assumed_seeds": p["assumed_seeds"],
                          "seeds": sorted({s for v in p["values"].values() for s in v})}
                         for p in pooled["sources"]],
             "rows": {}, "verdicts": []}
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(["table", "preset", "row", "metric", "statistic", "mean", "ci95_low",
              "ci95_high", "seeds", "values", "seed_ids"])
  for row in rows:
    for m in metrics:
      for st in STATISTICS:
        by_seed = values.get((row, m.key, st), {})
        seeds = sorted(by_seed)
        iv = stats.interval([by_seed[s] for s in seeds])
        summary["rows"].setdefault(row, {}).setdefault(m.key, {})[st] = vars(iv)
        w.writerow([table.name, preset, row, m.key, st, iv.mean, iv.low, iv.high, iv.n,
                    json.dumps([by_seed[s] for s in seeds]), json.dumps(seeds)])
  paths.makedirs(out_dir)
  paths.write_text(os.path.join(out_dir, "table.csv"), buf.getvalue())

  def fmt(d: dict, m: tables_lib.Metric, signed=False) -> str:
    iv = stats.Interval(**d)
    if iv.n == 0:
      return "–"
    s = iv.fmt(*((100.0, 1) if m.percent else (1.0, 3)))
    return "+" + s if signed and iv.mean >= 0 else s

  lines = [f"# {table.title} (pooled)", "", f"Paper: {table.paper}", "",
           f"Preset `{preset}`: {table.preset(preset).note}.", "", "Pooled from:", ""]
  for src in summary["sources"]:
    lines.append(f"* `{src['path']}`: seeds {src['seeds']}" + (
        " (read as seeds 0..n-1: that report's table.csv does not name its seeds)"
        if src["assumed_seeds"] else ""))
  lines += ["", "Runs on different machines agree statistically, not bitwise (XLA's CPU "
            "code differs by processor).", ""]
  head = ["method"] + [f"{m.label}: after (gain)" for m in metrics] + ["seeds"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  first = summary["rows"][rows[0]] if rows else None
  if first:
    lines.append("| base model | " + " | ".join(fmt(first[m.key]["base"], m)
                                                  for m in metrics) + " | |")
  for row in rows:
    per = summary["rows"][row]
    n = max(per[m.key]["gain"]["n"] for m in metrics)
    lines.append(f"| {table.row(row).label} | " + " | ".join(
        f"{fmt(per[m.key]['final'], m)} ({fmt(per[m.key]['gain'], m, True)})"
        for m in metrics) + f" | {n} |")
  lines += ["", "Values: mean over seeds [95 % t interval].", "",
            "| claim | verdict | interval (paired by seed) |", "|---|---|---|"]
  for c in table.claims_of(preset):
    iv = claim_interval(c, values)
    v = stats.verdict(c.kind, iv, c.margin)
    summary["verdicts"].append({"claim": c.text, "verdict": v, "interval": vars(iv),
                                "metric": c.metric, "on": c.on})
    m = next((m for m in metrics if m.key == c.metric), None)
    lines.append(f"| {c.text} | **{v}** | "
                 f"{fmt(vars(iv), m, True) if m else iv.fmt()} (n={iv.n}) |")
  paths.write_text(os.path.join(out_dir, "table.md"), "\n".join(lines) + "\n")
  paths.write_json(os.path.join(out_dir, "summary.json"), summary, indent=1)
  return summary


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m rft.repro.pool",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("sources", nargs="+", help="report folders (or their table.csv)")
  ap.add_argument("--out", required=True, help="folder for the pooled table")
  args = ap.parse_args(argv)
  summary = write(pool(args.sources), args.out)
  print(f"wrote {args.out}/table.md, table.csv, summary.json")
  for v in summary["verdicts"]:
    iv = v["interval"]
    print(f"  {v['claim']}: {v['verdict']} (n={iv['n']})")


if __name__ == "__main__":
  main()
