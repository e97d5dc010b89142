"""Meshes and shardings. Every jitted step runs under a `jax.sharding.Mesh`.

The batch dimension is sharded over the `data` axis; params are replicated (sharding
rules for FSDP/tensor parallelism build on the same helpers). Never pmap.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


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


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def use_mesh(mesh: Mesh):
  """Context manager making `mesh` the ambient mesh for the jitted steps inside."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return mesh
