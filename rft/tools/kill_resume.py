"""Kill-and-resume check: a run interrupted N times ends exactly where an uninterrupted
run ends.

    python -m rft.tools.kill_resume --config=configs/prdp.py:smoke --kills=8 \
        [--workdir=DIR] [--seed=0] [-- --config.key=value ...]

1. Runs `python -m rft.main --config=<config> <overrides>` once without interruption
   (DIR/reference) and times it.
2. Runs the same command in DIR/interrupted and interrupts it `--kills` times: once a
   start has written a new checkpoint, after a random delay (up to the reference's time
   per checkpoint) or, every third kill, just as a checkpoint is being written (a
   temporary orbax folder appears); alternately `kill -9` (SIGKILL) and SIGTERM. After each interruption the same
   command is started again (a SIGTERM'd run must exit 143 with the resume line, or, if
   the signal came before the training loop started, be terminated by it); the last
   start runs to the end.
3. Checks: the exported parameter files (*.msgpack, *.safetensors, in subfolders too,
   checkpoints aside) are byte-identical;
   every TensorBoard scalar tag holds the same steps as the reference's, each exactly
   once, with the same values (timing tags aside); every event file reads back whole
   (CRC-checked, no cut-short record).

Prints one JSON summary and exits 1 when a check fails. The same checks run in the
test suite on the smoke configs with a few kills (tests/test_reliability.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Optional

from rft import tb_events

EXPORTS = (".msgpack", ".safetensors")
# Tags whose values are wall-clock measurements (their steps are still compared).
TIMING = ("seconds", "per_sec", "time")


def _command(config: str, workdir: str, overrides) -> list:
  return [sys.executable, "-m", "rft.main", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def _env(cache: Optional[str]) -> dict:
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  if cache:  # restarts reuse compiled programs (what a requeued job does with a cache)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return env


def _saving(workdir: str) -> bool:
  """Whether a checkpoint is being written (orbax's temporary step folder exists)."""
  d = os.path.join(workdir, "checkpoints")
  try:
    return any("tmp" in name for name in os.listdir(d))
  except FileNotFoundError:
    return False


def _latest(workdir: str) -> Optional[int]:
  d = os.path.join(workdir, "checkpoints")
  steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def run_interrupted(cmd, workdir: str, env: dict, kills: int, duration: float,
                    rng: random.Random, timeout: float = 1800.0,
                    checkpoints: int = 1) -> list:
  """Starts `cmd` until it exits 0, interrupting it `kills` times; one record per start.

  Each interrupted start first makes progress (a checkpoint newer than the one it
  resumed from appears), then gets the signal after a random delay up to the reference's
  time per checkpoint (`duration / checkpoints`), or, every third kill, as soon as a
  checkpoint is being written (or after that delay if none starts). So every start gets
  further and `kills` interruptions happen as long as the run has more checkpoints than
  kills; a run that ends first simply ends."""
  starts = []
  gap = duration / max(checkpoints, 1)
  for k in range(kills + 1):
    sig = (signal.SIGKILL, signal.SIGTERM)[k % 2] if k < kills else None
    at_save = sig is not None and k % 3 == 2
    delay = rng.uniform(0.0, 1.0) * gap
    begin = _latest(workdir)
    t0 = time.time()
    with open(os.path.join(workdir + ".log"), "a") as log:
      log.write(f"\n===== start {k}: {sig and signal.Signals(sig).name} "
                f"{'at a save' if at_save else f'{delay:.1f}s'} after a new checkpoint\n")
      log.flush()
      proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
      sent, progressed = None, None
      while proc.poll() is None:
        now = time.time()
        if now - t0 > timeout:
          proc.kill()
          raise TimeoutError(f"{cmd} ran past {timeout}s")
        if sig is not None and sent is None:
          latest = _latest(workdir)
          if progressed is None and latest is not None and (begin is None or latest > begin):
            progressed = now
          if progressed is not None:
            waited = now - progressed
            due = (_saving(workdir) or waited >= gap) if at_save else waited >= delay
            if due:
              proc.send_signal(sig)
              sent = (signal.Signals(sig).name, round(now - t0, 2), _latest(workdir))
        time.sleep(0.005 if at_save else 0.02)
    code = proc.returncode
    starts.append({"signal": sent and sent[0], "at_seconds": sent and sent[1],
                   "at_save": at_save and sent is not None,
                   "resumed_from": begin, "checkpoint_at_signal": sent and sent[2],
                   "exit": code, "checkpoint_after": _latest(workdir)})
    if code == 0:
      return starts
    ok = (code == -signal.SIGKILL if sent and sent[0] == "SIGKILL" else
          code in (143, -signal.SIGTERM) if sent else False)
    if not ok:
      raise RuntimeError(f"start {k} exited {code} (signal sent: {sent}); see {workdir}.log")
  raise RuntimeError(f"the run did not finish after {kills} kills; see {workdir}.log")


def _exports(workdir: str) -> dict:
  """{relative path: bytes} of the exported parameter files (a bundle's .msgpack, an HF
  or diffusers folder's .safetensors), checkpoints aside."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("checkpoints"))
    for name in sorted(files):
      if name.endswith(EXPORTS):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


def _event_files_whole(workdir: str) -> list:
  """Event files that do not read back whole (a CRC error or a record cut short)."""
  bad = []
  for path in tb_events._event_files(workdir):  # pylint: disable=protected-access
    status = {}
    try:
      for _ in tb_events._iter_records(path, True, status):  # pylint: disable=protected-access
        pass
    except ValueError as e:
      bad.append(f"{os.path.basename(path)}: {e}")
      continue
    if status["truncated"]:
      bad.append(f"{os.path.basename(path)}: record cut short")
  return bad


def compare(reference: str, interrupted: str) -> dict:
  """The checks of step 3; {"ok": bool, "problems": [...], ...}."""
  problems = []
  a, b = _exports(reference), _exports(interrupted)
  if not a:
    problems.append(f"no exported parameter file in {reference}")
  if sorted(a) != sorted(b):
    problems.append(f"exported files differ: {sorted(a)} vs {sorted(b)}")
  problems += [f"{n} differs" for n in a if n in b and a[n] != b[n]]
  ra, rb = tb_events.read_scalars(reference), tb_events.read_scalars(interrupted)
  if sorted(ra) != sorted(rb):
    problems.append(f"scalar tags differ: only reference {sorted(set(ra) - set(rb))}, "
                    f"only interrupted {sorted(set(rb) - set(ra))}")
  for tag in sorted(set(ra) & set(rb)):
    sa, sb = [s for s, _ in ra[tag]], [s for s, _ in rb[tag]]
    if sorted(sb) != sorted(sa) or len(set(sb)) != len(sb):
      problems.append(f"{tag}: steps {sorted(sb)} (reference {sorted(sa)})")
    elif not any(t in tag for t in TIMING) and dict(ra[tag]) != dict(rb[tag]):
      problems.append(f"{tag}: values differ from the reference")
  problems += _event_files_whole(interrupted)
  return {"ok": not problems, "problems": problems, "exports": sorted(a),
          "tags": len(ra), "points": sum(len(v) for v in rb.values())}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  p.add_argument("--kills", type=int, default=6)
  p.add_argument("--workdir", default="workdirs/kill_resume")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoints", type=int, default=4,
                 help="checkpoints the run writes (steps / ckpt_every): the random delay "
                      "after a new checkpoint is up to the reference's time per checkpoint")
  p.add_argument("--cache", default=None,
                 help="JAX compilation cache folder (default: <workdir>/jax_cache)")
  p.add_argument("overrides", nargs="*", help="--config.key=value ... (after --)")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  ref, intr = (os.path.join(args.workdir, n) for n in ("reference", "interrupted"))
  for d in (ref, intr):
    if os.path.exists(d):
      raise SystemExit(f"{d} exists: give a fresh --workdir")
  env = _env(args.cache or os.path.join(args.workdir, "jax_cache"))
  t0 = time.time()
  with open(ref + ".log", "w") as log:
    subprocess.run(_command(args.config, ref, args.overrides), env=env, stdout=log,
                   stderr=log, check=True)
  duration = time.time() - t0
  starts = run_interrupted(_command(args.config, intr, args.overrides), intr, env,
                           args.kills, duration, random.Random(args.seed),
                           checkpoints=args.checkpoints)
  out = dict(config=args.config, overrides=args.overrides, kills=args.kills,
             reference_seconds=round(duration, 1), starts=starts, **compare(ref, intr))
  print(json.dumps(out, indent=1))
  return 0 if out["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
