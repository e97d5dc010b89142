"""Run an rft job on a Cloud TPU VM pod: python launch/tpu_pod.py --tpu=NAME --zone=Z
[--project=P] --config=... --workdir=gs://bucket/run [--config.key=value ...].

Prints and runs, in order (--dry_run prints only):
  1. the code onto every worker: by default a tarball of this checkout (no .git, .venv,
     workdirs, caches) copied with `gcloud compute tpus tpu-vm scp --worker=all` and
     unpacked into ~/REMOTE_DIR; with --repo_url, `git clone` + `git fetch REF` there;
  2. on every worker: a venv in REMOTE_DIR/.venv, `pip install -e . JAX_SPEC`;
  3. on every worker, through `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`:
     `python -m rft.main --config=... --workdir=... --distributed=on` (jax reads the pod's
     topology from the TPU VM metadata).
--skip_setup runs only step 3. The workdir must be one every worker writes to (gs://...).
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
from typing import Sequence

if __package__:  # imported as launch.<module> (a checkout) or rft.launch.<module> (a wheel)
  from . import common
else:  # run as a script: launch/ is sys.path[0]
  import common

REMOTE_TARBALL = "rft-src.tar.gz"
EXCLUDES = (".git", ".venv", "workdirs", ".pytest_cache", "__pycache__", "*.egg-info")


def gcloud(verb: str, tpu: str, zone: str, project: str | None, *args: str) -> list[str]:
  """gcloud compute tpus tpu-vm VERB ... --zone=Z [--project=P] --worker=all."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  if verb == "ssh":
    cmd.append(tpu)
  cmd += list(args) + [f"--zone={zone}"]
  if project:
    cmd.append(f"--project={project}")
  return cmd + ["--worker=all"]


def ssh(tpu: str, zone: str, project: str | None, remote: str) -> list[str]:
  return gcloud("ssh", tpu, zone, project, f"--command={remote}")


def setup_command(remote_dir: str, *, repo_url: str | None, ref: str, jax_spec: str,
                  python: str = "python3") -> str:
  """The shell command each worker runs to get the code and install it in a venv."""
  d = shlex.quote(remote_dir)
  if repo_url:
    fetch = (f"(test -d {d}/.git || git clone {shlex.quote(repo_url)} {d}) && "
             f"git -C {d} fetch origin {shlex.quote(ref)} && git -C {d} checkout --force FETCH_HEAD")
  else:
    fetch = f"mkdir -p {d} && tar -xzf {REMOTE_TARBALL} -C {d} && rm -f {REMOTE_TARBALL}"
  install = (f"cd {d} && {shlex.quote(python)} -m venv .venv && . .venv/bin/activate && "
             f"pip install -q -U pip && pip install -q -e . {shlex.quote(jax_spec)}")
  return f"{fetch} && {install}"


def run_command(remote_dir: str, command: Sequence[str], env: Sequence[tuple[str, str]] = ()
                ) -> str:
  """The shell command each worker runs to start the job."""
  words = common.assignments(env) + [shlex.join(command)]
  return f"cd {shlex.quote(remote_dir)} && . .venv/bin/activate && {' '.join(words)}"


def pod_commands(*, tpu: str, zone: str, project: str | None, command: Sequence[str],
                 remote_dir: str = "rft", repo_url: str | None = None, ref: str = "main",
                 jax_spec: str = "jax[tpu]", tarball: str | None = None,
                 env: Sequence[tuple[str, str]] = (), skip_setup: bool = False,
                 python: str = "python3") -> list[list[str]]:
  """All commands, in order, to run `command` (an rft.main argv) on every worker."""
  cmds = []
  if not skip_setup:
    if not repo_url:
      tarball = tarball or os.path.join(tempfile.gettempdir(), f"rft-src-{tpu}.tar.gz")
      cmds.append(["tar", "-czf", tarball, *(f"--exclude={e}" for e in EXCLUDES),
                   "-C", common.ROOT, "."])
      cmds.append(gcloud("scp", tpu, zone, project, tarball, f"{tpu}:{REMOTE_TARBALL}"))
    cmds.append(ssh(tpu, zone, project, setup_command(remote_dir, repo_url=repo_url, ref=ref,
                                                      jax_spec=jax_spec, python=python)))
  cmds.append(ssh(tpu, zone, project, run_command(remote_dir, command, env)))
  return cmds


def main(argv=None) -> int:
  p = common.parser(__doc__, workdir_required=True)
  p.add_argument("--tpu", required=True, help="TPU VM (pod) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--remote_dir", default="rft", help="checkout on each worker, under ~")
  p.add_argument("--repo_url", default=None, help="git clone this instead of copying the "
                 "local checkout")
  p.add_argument("--ref", default="main", help="with --repo_url: branch, tag or commit")
  p.add_argument("--jax_spec", default="jax[tpu]", help="pip requirement for jax on TPU")
  p.add_argument("--tarball", default=None, help="local path of the source tarball")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for the job (repeatable)")
  p.add_argument("--python", default="python3", help="worker interpreter that creates the venv")
  p.add_argument("--skip_setup", action="store_true", help="only start the job")
  args, extra = p.parse_known_args(argv)
  if os.path.isabs(args.remote_dir) or ".." in args.remote_dir.split("/"):
    p.error(f"--remote_dir={args.remote_dir!r}: give a path under the home directory")
  if not (common.IN_CHECKOUT or args.repo_url or args.skip_setup):
    p.error("there is no checkout to copy to the workers (this launcher was installed with "
            "the rft package): pass --repo_url=<git URL of rft> or --skip_setup")
  command = common.rft_command(args.config, args.workdir, common.passthrough(p, extra, strict=True),
                               python="python", distributed="on")
  cmds = pod_commands(tpu=args.tpu, zone=args.zone, project=args.project, command=command,
                      remote_dir=args.remote_dir, repo_url=args.repo_url, ref=args.ref,
                      jax_spec=args.jax_spec, tarball=args.tarball,
                      env=common.parse_env(p, args.env), skip_setup=args.skip_setup,
                      python=args.python)
  return common.execute(cmds, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
