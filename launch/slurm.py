"""Run an rft job on a SLURM GPU cluster: python launch/slurm.py --config=... --workdir=DIR
--nodes=N --gpus_per_node=G [--tasks=node|gpu] [--partition=P] [--account=A] [...].

Writes an sbatch script (DIR/rft.sbatch unless --script) and submits it with `sbatch`;
--dry_run prints the script and the exact sbatch command instead. The job runs
`srun python -m rft.main --config=... --workdir=... --distributed=on`: one process per
node driving all its GPUs (--tasks=node, the default) or one per GPU (--tasks=gpu). Inside
the step rft.distributed derives the coordinator (first host of SLURM_STEP_NODELIST, port
RFT_COORDINATOR_PORT or 61440 + SLURM_JOB_ID % 4096), the process count and id from the
SLURM_* variables. DIR must be on a filesystem every node sees; relative paths are
relative to the repository root (the job's working directory).
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

if __package__:  # imported as launch.<module> (a checkout) or rft.launch.<module> (a wheel)
  from . import common
else:  # run as a script: launch/ is sys.path[0]
  import common


def sbatch_script(command: Sequence[str], *, job_name: str, nodes: int, gpus_per_node: int,
                  tasks: str = "node", time: str = "04:00:00", partition: str | None = None,
                  account: str | None = None, cpus_per_task: int | None = None,
                  output: str = "slurm-%j.out", chdir: str = common.ROOT,
                  sbatch_args: Sequence[str] = (), venv: str | None = None,
                  env: Sequence[tuple[str, str]] = ()) -> str:
  """The sbatch script text. `command` is the rft.main argv each task runs (under srun)."""
  directives = [f"--job-name={job_name}", f"--nodes={nodes}",
                f"--ntasks-per-node={1 if tasks == 'node' else gpus_per_node}",
                f"--gpus-per-node={gpus_per_node}"]
  if cpus_per_task:
    directives.append(f"--cpus-per-task={cpus_per_task}")
  directives.append(f"--time={time}")
  if partition:
    directives.append(f"--partition={partition}")
  if account:
    directives.append(f"--account={account}")
  directives += [f"--output={output}", f"--chdir={chdir}", *sbatch_args]
  for d in directives:
    if any(c.isspace() for c in d) or d.endswith("="):
      raise ValueError(f"#SBATCH {d!r}: a directive value cannot be empty or hold whitespace")
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
           "# rft.distributed reads the coordinator, process count and id from srun's SLURM_*"
           " variables.",
           "set -eo pipefail"]
  if venv:
    lines.append(f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}")
  lines += [f"export {a}" for a in common.assignments(env)]
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *command]))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = common.parser(__doc__, workdir_required=True)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--tasks", choices=["node", "gpu"], default="node",
                 help="one process per node (drives all its GPUs) or one per GPU")
  p.add_argument("--time", default="04:00:00", help="wall-clock limit, [D-]HH:MM:SS")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--cpus_per_task", type=int, default=None)
  p.add_argument("--job_name", default=None, help="default: rft-<config file name>")
  p.add_argument("--output", default=None, help="job log (default: WORKDIR/slurm-%%j.out)")
  p.add_argument("--sbatch_arg", action="append", default=[],
                 help="extra #SBATCH directive, e.g. --sbatch_arg=--qos=high (repeatable)")
  p.add_argument("--venv", default=os.environ.get("VIRTUAL_ENV"),
                 help="virtualenv to activate in the job (default: $VIRTUAL_ENV; '' for none)")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for the job (repeatable)")
  p.add_argument("--python", default="python", help="interpreter inside the job")
  p.add_argument("--chdir", default=common.ROOT, help="the job's working directory")
  p.add_argument("--script", default=None, help="where to write the script "
                 "(default: WORKDIR/rft.sbatch)")
  args, extra = p.parse_known_args(argv)
  for name in ("nodes", "gpus_per_node"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  for value in args.sbatch_arg:
    if not value.startswith("-") or any(c.isspace() for c in value):
      p.error(f"--sbatch_arg={value!r}: expected one sbatch option such as --qos=high")
  workdir = os.path.join(args.chdir, args.workdir)  # an absolute workdir stays as it is
  command = common.rft_command(args.config, args.workdir, common.passthrough(p, extra, strict=True),
                               python=args.python, distributed="on")
  try:
    script = sbatch_script(
        command, job_name=args.job_name or f"rft-{common.config_stem(args.config)}",
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks=args.tasks, time=args.time,
        partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
        output=args.output or os.path.join(workdir, "slurm-%j.out"), chdir=args.chdir,
        sbatch_args=args.sbatch_arg, venv=args.venv, env=common.parse_env(p, args.env))
  except ValueError as e:
    p.error(str(e))
  path = os.path.abspath(args.script or os.path.join(workdir, "rft.sbatch"))
  submit = ["sbatch", path]
  if args.dry_run:
    print(script)
    print(shlex.join(submit), flush=True)
    return 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  os.makedirs(workdir, exist_ok=True)  # the job log goes there
  with open(path, "w") as f:
    f.write(script)
  print(f"# wrote {path}")
  return common.execute([submit], dry_run=False)


if __name__ == "__main__":
  sys.exit(main())
