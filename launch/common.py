"""Shared pieces of the launchers: arguments, the `python -m rft.main` command, quoting,
print-or-run.

Overrides pass through to rft.main as they are (`--config.key=value`, `--config.key value`);
the cluster launchers accept only `--config.*` and anything after a literal `--`, so a
mistyped launcher flag fails here instead of in the queue. Every command is printed with
`shlex.join`, so what is printed is what runs (spaces, quotes, `$`, globs survive).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from typing import Sequence

_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# launch/ of a checkout: commands run in the repository root. Installed from a wheel
# (as rft/launch/, no checkout around it) they run in the working directory.
IN_CHECKOUT = os.path.isfile(os.path.join(_PARENT, "setup.py"))
ROOT = _PARENT if IN_CHECKOUT else os.getcwd()


def parser(doc: str, *, workdir_required: bool = False) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc.splitlines()[0], allow_abbrev=False)
  p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  p.add_argument("--workdir", required=workdir_required, default=None,
                 help="run directory (relative paths are relative to the repository root)")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return p


def passthrough(p: argparse.ArgumentParser, extra: Sequence[str], *, strict: bool) -> list[str]:
  """The arguments for rft.main. With `strict`, an unknown `--flag` that is not a
  `--config.` override (and not after `--`) is a usage error naming it."""
  if not strict:
    return list(extra)
  out, verbatim = [], False
  for a in extra:
    if verbatim:
      out.append(a)
    elif a == "--":
      verbatim = True
    elif a.startswith("-") and not a.startswith("--config.") and not re.match(r"-[\d.]", a):
      p.error(f"unknown flag {a!r}: pass rft.main flags as --config.key=value, or after --")
    else:
      out.append(a)
  return out


def rft_command(config: str, workdir: str | None, extra: Sequence[str], *, python: str = "python",
                distributed: str | None = None) -> list[str]:
  """[python, -m, rft.main, --config=..., --workdir=..., (--distributed=...), *extra]."""
  cmd = [python, "-m", "rft.main", f"--config={config}"]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  if distributed:
    cmd.append(f"--distributed={distributed}")
  return cmd + list(extra)


def parse_env(p: argparse.ArgumentParser, pairs: Sequence[str]) -> list[tuple[str, str]]:
  """--env KEY=VALUE items -> [(KEY, VALUE)]; a malformed one is a usage error."""
  out = []
  for item in pairs:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      p.error(f"--env {item!r}: expected NAME=VALUE with a shell variable NAME")
    out.append((key, value))
  return out


def assignments(env: Sequence[tuple[str, str]]) -> list[str]:
  """Shell words `KEY=value` (value quoted, KEY bare so the shell sees an assignment)."""
  return [f"{k}={shlex.quote(v)}" for k, v in env]


def config_stem(config: str) -> str:
  return os.path.splitext(os.path.basename(config.partition(":")[0]))[0]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a local jax coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def execute_together(commands: Sequence[tuple[Sequence[tuple[str, str]], Sequence[str]]],
                     dry_run: bool, cwd: str = ROOT) -> int:
  """Prints each `(env, command)` as `KEY=value ... command` and, unless `dry_run`, starts
  them all at once (the processes of one multi-process job) and waits; when one fails the
  others are stopped (a peer would otherwise wait for it forever). Returns the first
  non-zero exit status, else 0."""
  for env, cmd in commands:
    print(shlex.join(cmd) if not env else " ".join(assignments(env)) + " " + shlex.join(cmd),
          flush=True)
  if dry_run:
    return 0
  procs = [subprocess.Popen(list(cmd), cwd=cwd, env={**os.environ, **dict(env)})
           for env, cmd in commands]
  try:
    while True:
      codes = [p.poll() for p in procs]
      bad = [c for c in codes if c not in (None, 0)]
      if bad or all(c == 0 for c in codes):
        return bad[0] if bad else 0
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()


def execute(commands: Sequence[Sequence[str]], dry_run: bool, cwd: str = ROOT) -> int:
  """Prints each command (shlex.join) and, unless `dry_run`, runs them in turn, stopping
  at the first failure; returns its exit status."""
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not dry_run:
      try:
        rc = subprocess.call(list(cmd), cwd=cwd)
      except FileNotFoundError:
        print(f"{cmd[0]}: command not found (install it, or print the commands with --dry_run)",
              file=sys.stderr)
        return 127
      if rc:
        return rc
  return 0
