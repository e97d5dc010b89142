"""Multi-process JAX: one process per host (or per GPU), every device in one global mesh.

:func:`initialize` calls ``jax.distributed.initialize`` when the run is multi-process,
before anything touches jax devices. Where the process count, process id and
coordinator come from (first match wins; explicit arguments override field by field):

* ``RFT_COORDINATOR`` (host:port), ``RFT_NUM_PROCESSES``, ``RFT_PROCESS_ID``
  (optional ``RFT_LOCAL_DEVICE_IDS``, e.g. ``0,1``): all three or none;
* SLURM, inside an ``srun`` step (``SLURM_STEP_ID``) with ``SLURM_STEP_NUM_TASKS`` /
  ``SLURM_NTASKS`` > 1: process id ``SLURM_PROCID``; coordinator the first host of
  ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``) on port ``RFT_COORDINATOR_PORT``
  or ``61440 + SLURM_JOB_ID % 4096`` (jax's own choice). With several tasks per node each
  task drives one GPU, ``SLURM_LOCALID`` (unless SLURM already narrowed
  ``CUDA_VISIBLE_DEVICES`` to one GPU); with one task per node it drives all of them;
* a TPU pod: ``TPU_WORKER_HOSTNAMES`` naming more than one host, or any ``MEGASCALE_*``
  variable (multislice); jax reads the rest from the TPU VM's metadata.

``mode="on"`` always initialises (with no variables above it lets jax detect the cluster:
Cloud TPU metadata, Open MPI, k8s, ...); ``"auto"`` only when a source above says more
than one process; ``"off"`` never. On CPU the cross-process collectives are gloo
(``jax_cpu_collectives_implementation``; in jax 0.10 that is already the default, older
versions had it unset, which would leave multi-process CPU computations without
collectives).

:func:`global_batch` turns each process's host slice into global ``jax.Array`` s
(``jax.make_array_from_process_local_data``); :func:`process_rows` says which rows of a
global batch a process supplies.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rft.sharding import DATA  # the mesh axis names are defined once, in rft.sharding

MODES = ("auto", "on", "off")
_RFT_VARS = ("RFT_COORDINATOR", "RFT_NUM_PROCESSES", "RFT_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """What :func:`initialize` did.

  initialized: whether ``jax.distributed.initialize`` was called (now or before).
  source: ``off`` | ``single`` (nothing says multi-process) | ``args`` | ``env``
    (RFT_* variables) | ``slurm`` | ``tpu`` | ``jax`` (jax's own cluster detection).
  """
  initialized: bool
  source: str
  process_index: int
  process_count: int
  coordinator: str | None = None
  local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  source: str
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None
  detect: bool = False  # let jax detect unset values (TPU metadata, MPI, k8s)


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
  raw = env[name]
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return value


def _device_ids(raw: str, name: str) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in raw.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not a comma-separated list of device ids") from None


def _check_coordinator(address: str, name: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{name}={address!r} is not host:port (e.g. 10.0.0.1:61440)")
  return address


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: ``gpu[003-007,9],cpu1`` -> ``gpu003``."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      end = i
      break
  item = nodelist[:end].strip()
  host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], item)
  if not host or "[" in host or "]" in host:
    raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}")
  return host


def _from_rft_env(env: Mapping[str, str]) -> _Plan | None:
  present = [n for n in _RFT_VARS if env.get(n)]
  if not present:
    return None
  missing = [n for n in _RFT_VARS if not env.get(n)]
  if missing:
    raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} not: set all of "
                     f"{', '.join(_RFT_VARS)} (or none)")
  n = _int(env, "RFT_NUM_PROCESSES", 1)
  pid = _int(env, "RFT_PROCESS_ID", 0)
  if pid >= n:
    raise ValueError(f"RFT_PROCESS_ID={pid} must be < RFT_NUM_PROCESSES={n}")
  local = env.get("RFT_LOCAL_DEVICE_IDS")
  return _Plan("env", _check_coordinator(env["RFT_COORDINATOR"], "RFT_COORDINATOR"), n, pid,
               _device_ids(local, "RFT_LOCAL_DEVICE_IDS") if local else None)


def _from_slurm(env: Mapping[str, str]) -> _Plan | None:
  if "SLURM_STEP_ID" not in env:  # sbatch script or salloc shell, not an srun step
    return None
  ntasks_var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
  if not env.get(ntasks_var):
    return None
  n = _int(env, ntasks_var, 1)
  for name in ("SLURM_PROCID", "SLURM_JOB_ID"):
    if not env.get(name):
      raise ValueError(f"SLURM step with {ntasks_var}={n} but {name} is not set")
  pid = _int(env, "SLURM_PROCID", 0)
  if pid >= n:
    raise ValueError(f"SLURM_PROCID={pid} must be < {ntasks_var}={n}")
  nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(v)),
                      None)
  if nodelist_var is None:
    raise ValueError(f"SLURM step with {ntasks_var}={n} but neither SLURM_STEP_NODELIST nor "
                     "SLURM_JOB_NODELIST is set: cannot place the coordinator")
  port = (_int(env, "RFT_COORDINATOR_PORT", 1) if env.get("RFT_COORDINATOR_PORT")
          else 61440 + _int(env, "SLURM_JOB_ID", 0) % 4096)
  coordinator = f"{first_host(env[nodelist_var])}:{port}"
  nodes_var = next((v for v in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES") if env.get(v)), None)
  nodes = _int(env, nodes_var, 1) if nodes_var else 1
  local = None
  visible = [s for s in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
  if n > nodes and env.get("SLURM_LOCALID") and len(visible) != 1:
    local = (_int(env, "SLURM_LOCALID", 0),)  # one task per GPU, all GPUs visible
  return _Plan("slurm", coordinator, n, pid, local)


def _from_tpu(env: Mapping[str, str]) -> _Plan | None:
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or any(k.startswith("MEGASCALE_") for k in env):
    return _Plan("tpu", None, None, None, None, detect=True)
  return None


def detect(environ: Mapping[str, str] | None = None) -> _Plan | None:
  """The multi-process plan the environment describes (RFT_*, SLURM, TPU), or None."""
  env = os.environ if environ is None else environ
  for source in (_from_rft_env, _from_slurm, _from_tpu):
    plan = source(env)
    if plan is not None:
      return plan
  return None


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives for the CPU backend (must precede backend creation)."""
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # jax < 0.4.27 named it differently
    jax.config.update("jax_cpu_enable_gloo_collectives", True)


def _global_state():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state


def initialize(mode: str = "auto", coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, *,
               environ: Mapping[str, str] | None = None,
               initialization_timeout: int = 300) -> DistributedInfo:
  """Joins the multi-process job when `mode` (auto | on | off) and the environment say so.

  Call once, before anything touches jax devices; a second call returns the state of
  the first. Explicit arguments override the environment field by field; an
  incomplete or inconsistent setting raises ValueError naming the argument or variable.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {', '.join(MODES)}")
  if mode == "off":
    return DistributedInfo(False, "off", 0, 1)
  if jax.distributed.is_initialized():
    state = _global_state()
    return DistributedInfo(True, "jax", state.process_id, state.num_processes,
                           state.coordinator_address)
  plan = detect(environ)
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in given.values()):
    base = plan or _Plan("args", None, None, None)
    plan = _Plan("args", coordinator or base.coordinator,
                 base.num_processes if num_processes is None else int(num_processes),
                 base.process_id if process_id is None else int(process_id),
                 base.local_device_ids, base.detect)
    if not plan.detect:
      missing = [k for k, v in (("coordinator", plan.coordinator),
                                ("num_processes", plan.num_processes),
                                ("process_id", plan.process_id)) if v is None]
      if missing:
        raise ValueError(f"distributed initialize: {', '.join(missing)} not given and not in "
                         f"the environment ({', '.join(_RFT_VARS)} or SLURM)")
    if plan.coordinator:
      _check_coordinator(plan.coordinator, "coordinator")
    if plan.num_processes is not None and plan.process_id is not None and not (
        0 <= plan.process_id < plan.num_processes):
      raise ValueError(f"process_id={plan.process_id} must be in [0, num_processes="
                       f"{plan.num_processes})")
  if plan is None:
    if mode == "auto":
      return DistributedInfo(False, "single", 0, 1)
    plan = _Plan("jax", None, None, None, detect=True)  # --distributed=on: ask jax
  elif plan.num_processes == 1 and not plan.detect and mode == "auto":
    return DistributedInfo(False, plan.source, 0, 1)
  if local_device_ids is not None:
    plan = dataclasses.replace(plan, local_device_ids=tuple(int(i) for i in local_device_ids))
  _use_gloo_on_cpu()
  try:
    jax.distributed.initialize(
        coordinator_address=plan.coordinator, num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
        cluster_detection_method=None if plan.detect else "deactivate",
        initialization_timeout=initialization_timeout)
  except (ValueError, RuntimeError) as e:
    if plan.source == "jax":
      raise ValueError(
          f"--distributed=on but no multi-process environment was found ({e}): set "
          f"{', '.join(_RFT_VARS)}, run inside srun, or on a TPU pod VM") from e
    raise RuntimeError(f"jax.distributed.initialize failed (from {plan.source}: coordinator="
                       f"{plan.coordinator}, num_processes={plan.num_processes}, process_id="
                       f"{plan.process_id}): {e}") from e
  state = _global_state()
  return DistributedInfo(True, plan.source, state.process_id, state.num_processes,
                         state.coordinator_address, plan.local_device_ids)


def is_main_process() -> bool:
  """Process 0: the one that logs, writes images and exports."""
  return jax.process_index() == 0


def _sharding(mesh: Mesh, spec: Any) -> NamedSharding:
  if isinstance(spec, NamedSharding):
    return spec
  return NamedSharding(mesh, P(DATA) if spec is None else spec)


def process_rows(global_size: int, mesh: Mesh, spec: Any = None) -> slice:
  """The rows ``[start, stop)`` of a global batch of `global_size` this process supplies
  to :func:`global_batch` when dim 0 is sharded as ``spec[0]`` (default ``data``)."""
  sharding = _sharding(mesh, spec)
  first = sharding.spec[0] if len(sharding.spec) else None
  rows = NamedSharding(sharding.mesh, P(first))
  idx = [ix[0] for ix in rows.addressable_devices_indices_map((global_size,)).values()]
  start = min(i.start or 0 for i in idx)
  stop = max(global_size if i.stop is None else i.stop for i in idx)
  covered = {r for i in idx for r in range(*i.indices(global_size))}
  if covered != set(range(start, stop)):
    raise ValueError(f"this process's devices hold rows {sorted(covered)} of {global_size}: "
                     "not one contiguous block; reorder the mesh devices by process")
  return slice(start, stop)


def global_batch(local_tree: Any, mesh: Mesh, spec: Any = None) -> Any:
  """Global ``jax.Array`` s, sharded as ``spec`` (default ``P('data')``) on `mesh`, from
  each process's host slice (the rows :func:`process_rows` names; all processes call).

  The global leading size is the local one times the number of processes along the
  sharded axis (``jax.make_array_from_process_local_data``); in one process the local
  slice is the whole batch.
  """
  sharding = _sharding(mesh, spec)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("global_batch: leaves need a leading batch dimension, got a scalar")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, local_tree)


def local_batch_size(global_size: int) -> int:
  """``global_size / process_count``; ValueError if it does not divide."""
  n = jax.process_count()
  if global_size % n:
    raise ValueError(f"global batch size {global_size} is not divisible by the {n} processes")
  return global_size // n
