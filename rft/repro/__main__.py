"""python -m rft.repro <table>[,<table>...] [--preset P] [--seeds N|A-B] [--workdir DIR]"""
from __future__ import annotations

import argparse

from rft import repro


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m rft.repro", description=repro.__doc__.split("\n\n")[0])
  ap.add_argument("tables", help="table name(s), comma-separated, or 'list'; known: "
                  + ", ".join(sorted(repro.tables.ALL)))
  ap.add_argument("--preset", default="cpu", help="cpu | accelerator | smoke | sd (per table)")
  ap.add_argument("--seeds", default=None,
                  help="seeds per row: a count (3 = seeds 0-2; default: the preset's), a "
                       "range (3-5) or a list (0,2,4)")
  ap.add_argument("--rows", default="", help="only these rows, comma-separated")
  ap.add_argument("--workdir", default="workdirs/repro")
  ap.add_argument("--report_only", action="store_true",
                  help="write the report from finished runs; start nothing")
  args = ap.parse_args(argv)
  if args.tables == "list":
    for t in repro.tables.ALL.values():
      print(f"{t.name}: {t.title} (presets: {', '.join(sorted(t.presets))})")
    return
  for name in args.tables.split(","):
    repro.run(name, args.preset, args.workdir, seeds=args.seeds,
              rows=[r for r in args.rows.split(",") if r] or None, report_only=args.report_only)


if __name__ == "__main__":
  main()
