"""Run an rft job on this machine: python launch/local.py --config=configs/X.py[:arg] [...].

Builds the exact `python -m rft.main` command (extra flags such as --config.key=value
pass through), prints it, and runs it unless --dry_run. GPU-cluster and TPU-pod
runners will sit beside this one.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def build_command(config: str, workdir: str | None, extra: list[str], python: str) -> list[str]:
  cmd = [python, "-m", "rft.main", f"--config={config}"]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  return cmd + list(extra)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  p.add_argument("--workdir", default=None)
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--dry_run", action="store_true", help="print the command, run nothing")
  args, extra = p.parse_known_args(argv)
  cmd = build_command(args.config, args.workdir, extra, args.python)
  print(shlex.join(cmd), flush=True)
  if args.dry_run:
    return 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.call(cmd, cwd=root)


if __name__ == "__main__":
  sys.exit(main())
