"""Meshes and shardings. Every jitted step runs under a `jax.sharding.Mesh`.

The batch dimension is sharded over the `data` axis (`shard_batch`), or over whichever
of `data` / `fsdp` the mesh has (`shard_batch_axes`); params are replicated
(`replicate`) or placed by `rft.sharding` rules (`shard_tree`: FSDP / tensor parallelism,
optimizer and train state following their params). Never pmap.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rft import sharding
from rft.sharding import DATA, FSDP  # noqa: F401  (the axis names are defined there, once)


def split_cpu(num_devices: int) -> bool:
  """Before JAX starts: expose the host CPU as `num_devices` XLA devices (0: no change).

  XLA:CPU keeps only ~1.3 of 2 cores busy on one device for the ShapesWorld UNet; the
  same batch split data-parallel over 8 CPU devices runs the forward 1.8x and
  forward + backward 2x faster (`benchmarks/prdp_epoch.py`). An explicit
  `--xla_force_host_platform_device_count` in XLA_FLAGS wins. Accelerators are untouched.
  Returns whether the setting was applied.

  Caveat, seen here: many small multi-device programs dispatched one op at a time (e.g.
  a tree_map of jnp.add over gradient trees) can deadlock XLA:CPU's in-process
  collectives, with any device count > 1. XLA's 40 s collective watchdog then kills the
  process; the online loop keeps its per-epoch work inside a few jitted programs, and
  `rft.repro` resumes a killed run from its last checkpoint.
  """
  import os
  if num_devices < 0:
    raise ValueError(f"config.cpu_devices={num_devices}; use 0 (unchanged) or a device count")
  if not num_devices or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return False
  jax.config.update("jax_num_cpu_devices", int(num_devices))
  return True


def make_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh with named axes, e.g. {"data": -1}; one size may be -1 ("the rest").

  The default is every device on `data`. Sizes must multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {DATA: -1})
  sizes = list(axes.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {axes}: at most one size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh axes {axes}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh axes {dict(zip(axes, sizes))} need {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), tuple(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Place a host batch (pytree of arrays with a leading batch dim) on the mesh.

  The batch size must be divisible by the size of the `data` axis.
  """
  n = mesh.shape[DATA]
  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f"batch dimension {x.shape[:1]} is not divisible by the {n} devices "
                       f"of mesh axis '{DATA}'")
    return jax.device_put(x, batch_sharding(mesh))
  return jax.tree.map(put, batch)


def shard_batch_axes(batch: Any, mesh: Mesh, batch_size: int | None = None) -> Any:
  """Place a host batch on the mesh with its leading dim split over every data-parallel
  axis the mesh has (`data` and `fsdp`: `rft.sharding.batch_spec`); `tensor` devices
  hold the same rows. Without `data` / `fsdp` axes the batch is replicated.

  With `batch_size`, only leaves whose leading dim equals it are split; the others
  (shared timesteps, the null condition, scalars) are replicated. Without it every leaf
  is split, and must have a leading dim divisible by the data-parallel device count.
  """
  axes = tuple(a for a in (DATA, FSDP) if a in mesh.shape)
  n = int(np.prod([mesh.shape[a] for a in axes]))

  def put(x):
    x = np.asarray(x)
    per_row = x.ndim > 0 and (batch_size is None or x.shape[0] == batch_size)
    if not per_row:
      if batch_size is None:
        raise ValueError(f"batch leaf of shape {x.shape} has no batch dimension to split "
                         f"over mesh axes {axes}")
      return jax.device_put(x, replicated(mesh))
    if x.shape[0] % n:
      raise ValueError(f"batch dimension {x.shape[:1]} is not divisible by the {n} devices "
                       f"of mesh axes {axes}")
    return jax.device_put(x, NamedSharding(mesh, sharding.batch_spec(mesh, x.ndim)))
  return jax.tree.map(put, batch)


def tree_shardings(tree: Any, specs_or_rules: Any, mesh: Mesh, params: Any = None) -> Any:
  """`NamedSharding` tree for a params tree, a `TrainState` or an optimizer state on `mesh`.

  `specs_or_rules` is a `rft.sharding.ShardingRules` (the params' specs then come from
  `rft.sharding.param_specs`) or a tree of `PartitionSpec`, either matching `tree` (used
  as is) or matching the params. The params are `params`, else `tree.params` (a
  `TrainState`), else `tree` itself. A tree that is not the params gets the params'
  specs by `rft.sharding.follow_specs`: Adam moments and EMA copies follow their param,
  step counts and other leaves are replicated. Leaves may be arrays or
  `jax.ShapeDtypeStruct`s.
  """
  is_spec = lambda x: isinstance(x, P)
  if isinstance(specs_or_rules, sharding.ShardingRules):
    ref = params if params is not None else getattr(tree, "params", tree)
    specs = sharding.param_specs(ref, specs_or_rules, mesh)
  elif (jax.tree.structure(specs_or_rules, is_leaf=is_spec) == jax.tree.structure(tree)
        and params is None):
    ref, specs = tree, specs_or_rules
  else:
    ref = params if params is not None else getattr(tree, "params", tree)
    specs = specs_or_rules
  if ref is not tree:
    specs = sharding.follow_specs(tree, ref, specs)
  # (mapped over `tree`: a None subtree, e.g. a TrainState without EMA, stays None)
  return jax.tree.map(lambda _, s: NamedSharding(mesh, s), tree, specs)


def shard_tree(tree: Any, specs_or_rules: Any, mesh: Mesh, params: Any = None) -> Any:
  """`jax.device_put` `tree` onto `mesh` with :func:`tree_shardings`."""
  return jax.device_put(tree, tree_shardings(tree, specs_or_rules, mesh, params))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def use_mesh(mesh: Mesh):
  """Context manager making `mesh` the ambient mesh for the jitted steps inside."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return mesh
