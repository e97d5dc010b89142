"""Shared test helpers: run rft.main or a script in a fresh Python process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses share a persistent XLA compilation cache: the many smoke runs of the same
# config compile once per test session instead of once per process.
JAX_CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")
# Subprocess runs (smoke configs: files written, resume, errors, equality between two runs
# of one program) are mostly XLA compilation. LLVM's -O0 compiles the same HLO about 1.6x
# faster (pretrain smoke 64 s -> 41 s) and the tiny models barely run slower. In-process
# tests keep XLA's default, so the numerics users get (bitwise on-policy ratios, parity
# with the reference libraries) are tested at it. TEST_XLA_FLAGS="" turns this off.
SUBPROCESS_XLA_FLAGS = os.environ.get(
    "TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


# DDPO's smoke update runs about 13x slower at -O0 (9.4 s instead of 0.7 s per epoch,
# measured with the persistent cache warm), so tests that run it for several epochs or
# several times are faster at XLA's default level: run_main(..., env=DEFAULT_XLA).
DEFAULT_XLA = {"XLA_FLAGS": ""}


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: the fast-compile flags, plus `devices` fake CPUs."""
  flags = SUBPROCESS_XLA_FLAGS.split()
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def run_python(args, *, devices: int | None = None, timeout: int = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
  e = dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", XLA_FLAGS=xla_flags(devices))
  e.update(env or {})
  p = subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                     timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
  return p


def run_main(config: str, workdir, *overrides: str, **kw) -> subprocess.CompletedProcess:
  return run_python(["-m", "rft.main", f"--config={config}", f"--workdir={workdir}", *overrides],
                    **kw)


def clean_env(**extra) -> dict:
  """This environment without multi-process variables (RFT_*, SLURM_*, TPU_*, ...), on
  CPU, with `extra` added."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("RFT_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR"))}
  env.update({"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(), **extra})
  return env


def run_processes(args, num_processes: int = 2, devices_each: int = 4, timeout: int = 600,
                  env: dict | None = None) -> list[str]:
  """`python args...` as `num_processes` jax processes joined through RFT_COORDINATOR on
  127.0.0.1 (each with `devices_each` fake CPU devices); their outputs. Raises
  AssertionError with the log of any process that failed."""
  from launch.common import free_port
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=clean_env(
          XLA_FLAGS=xla_flags(devices_each),
          RFT_COORDINATOR=f"127.0.0.1:{port}", RFT_NUM_PROCESSES=str(num_processes),
          RFT_PROCESS_ID=str(i), **(env or {})))
      for i in range(num_processes)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    if p.returncode != 0:
      raise AssertionError(f"process {i} of {args} failed ({p.returncode}):\n"
                           f"{logs[i][-4000:]}")
  return logs


def import_open_clip():
  """``open_clip`` (the OpenCLIP reference for the HPSv2 / OpenCLIP-format parity tests).

  PyPI's torchvision is a CUDA build that cannot load next to the CPU torch we test
  with (and, once installed, breaks ``transformers``' imports), so the test command
  installs ``open_clip_torch`` with ``--no-deps`` and no torchvision. open_clip imports
  torchvision only for image transforms and a frozen batch-norm class, neither of which
  the model code we compare against uses: while it is imported, those modules are
  placeholders, removed again right after so nothing else sees a fake torchvision.
  """
  import importlib.util
  import types
  if importlib.util.find_spec("open_clip") is None:
    import pytest
    pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
  if "open_clip" in sys.modules:
    return sys.modules["open_clip"]
  try:  # open_clip imports transformers, whose import probes torchvision's spec
    import transformers  # noqa: F401
  except ImportError:
    pass

  class _AnyAttr(type):  # placeholder classes: any attribute (InterpolationMode.BICUBIC)
    def __getattr__(cls, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return name

  class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _AnyAttr(name, (), {"__init__": lambda self, *a, **k: None})

  names = ["torchvision", "torchvision.ops", "torchvision.ops.misc",
           "torchvision.transforms", "torchvision.transforms.functional"]
  have_tv = importlib.util.find_spec("torchvision") is not None
  added = [] if have_tv else [n for n in names if n not in sys.modules]
  for n in added:
    sys.modules[n] = _Placeholder(n)
  for n in added:  # `import a.b.c as x` reads a.b, then .c, as attributes
    parent, _, child = n.rpartition(".")
    if parent in added:
      setattr(sys.modules[parent], child, sys.modules[n])
  try:
    import open_clip  # pylint: disable=import-outside-toplevel
  finally:
    for n in added:
      sys.modules.pop(n, None)
  return open_clip


# DDIM shorthands over rft.diffusion.sampling (the samplers' shared rollouts) with the
# DDIM settings as keywords, as the DDIM tests state them.
def ddim_sampler(schedule, eta=1.0, clip_x0=None):
  from rft.diffusion.ddim import DDIMSampler
  return DDIMSampler(schedule, eta, clip_x0)


def ddim_sample(eps_fn, params, x_T, cond, null, *, schedule, num_steps, eta=1.0,
                guidance_scale=1.0, key=None, clip_x0=None, record_x0=False):
  from rft.diffusion import sampling
  return sampling.rollout(eps_fn, params, ddim_sampler(schedule, eta, clip_x0), x_T, cond, null,
                          num_steps=num_steps, guidance_scale=guidance_scale, key=key,
                          record_x0=record_x0)


def trajectory_log_probs(eps_fn, params, traj, cond, null, *, schedule, eta, guidance_scale=1.0,
                         clip_x0=None, reduce="mean"):
  from rft.diffusion import sampling
  return sampling.trajectory_log_probs(eps_fn, params, ddim_sampler(schedule, eta, clip_x0),
                                       traj, cond, null, guidance_scale=guidance_scale,
                                       reduce=reduce)


def transition_log_prob(eps_fn, params, x_t, x_prev, t, prev_t, cond, null, *, schedule, eta,
                        guidance_scale=1.0, clip_x0=None):
  from rft.diffusion import sampling
  return sampling.transition_log_prob(eps_fn, params, ddim_sampler(schedule, eta, clip_x0),
                                      x_t, x_prev, t, prev_t, cond, null,
                                      guidance_scale=guidance_scale)
