"""Shared test helpers: run rft.main or a script in a fresh Python process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(args, *, devices: int | None = None, timeout: int = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
  e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  p = subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                     timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
  return p


def run_main(config: str, workdir, *overrides: str, **kw) -> subprocess.CompletedProcess:
  return run_python(["-m", "rft.main", f"--config={config}", f"--workdir={workdir}", *overrides],
                    **kw)
