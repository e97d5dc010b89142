"""Shared test helpers: run rft.main or a script in a fresh Python process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses share a persistent XLA compilation cache: the many smoke runs of the same
# config compile once per test session instead of once per process.
JAX_CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")


def run_python(args, *, devices: int | None = None, timeout: int = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
  e = dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **(env or {}))
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
