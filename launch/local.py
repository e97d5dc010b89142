"""Run an rft job on this machine: python launch/local.py --config=configs/X.py[:arg] [...].

Builds the exact `python -m rft.main` command (extra flags such as --config.key=value
pass through), prints it, and runs it unless --dry_run. Beside it: launch/slurm.py (GPU
clusters) and launch/tpu_pod.py (Cloud TPU VM pods).
"""
from __future__ import annotations

import sys

try:
  from launch import common
except ImportError:  # run as a script: launch/ is sys.path[0]
  import common


def build_command(config: str, workdir: str | None, extra: list[str], python: str) -> list[str]:
  return common.rft_command(config, workdir, extra, python=python)


def main(argv=None) -> int:
  p = common.parser(__doc__)
  p.add_argument("--python", default=sys.executable)
  args, extra = p.parse_known_args(argv)
  cmd = build_command(args.config, args.workdir, common.passthrough(p, extra, strict=False),
                      args.python)
  return common.execute([cmd], args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
