"""Paper tables as commands: `python -m rft.repro <table> [--preset cpu|accelerator|smoke]
[--seeds N] [--workdir DIR]` runs every row (method x seed) through the normal configs,
resuming interrupted rows and skipping finished ones, and writes table.md, table.csv,
curves.png, before/after grids and a verdict per claim (rft.repro.report).

From Python (a notebook):

    from rft import repro
    summary = repro.run("prdp_table1", preset="cpu", workdir="workdirs/repro")

Tables: rft.repro.tables (ShapesWorld analogs of PRDP's Tables 1, 2, 3 and 5, and the
Stable Diffusion settings where weights exist).
"""
from __future__ import annotations

import os

from rft.repro import report, runner, stats, tables

__all__ = ["run", "report", "runner", "stats", "tables"]


def hardware() -> str:
  """The devices runs will use, in words (e.g. 'cpu (2 cores)' or 'NVIDIA H100 x1')."""
  import jax
  devs = jax.devices()
  if devs[0].platform == "cpu":
    return f"cpu ({os.cpu_count()} cores)"
  return f"{devs[0].device_kind} x{len(devs)}"


def run(table: str, preset: str = "cpu", workdir: str = "workdirs/repro",
        seeds: int | str | None = None, rows: list[str] | None = None, report_only: bool = False,
        echo=print) -> dict:
  """Runs (or resumes) a table and writes its report; returns the summary dict."""
  t = tables.get(table)
  runs = runner.plan(t, preset, workdir, seeds=seeds, rows=rows)
  runner.check_configs(runs)
  if not report_only:
    env = {}
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # seeds and rows share compilations
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.expanduser("~"), ".cache",
                                                      "rft_jax")
    runner.execute(runs, env=env, echo=echo)
  out = os.path.join(workdir, t.name, preset)
  summary = report.write(t, preset, runs, out, hardware=hardware())
  echo(f"wrote {out}/table.md, table.csv, curves.png, grids/")
  for v in summary["verdicts"]:
    echo(f"  {v['claim']}: {v['verdict']}")
  return summary
