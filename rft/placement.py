"""Where a training loop puts its arrays: the mesh, sharding rules, batches, host copies.

One `Placement` per run, from the config (`config.mesh`, `config.sharding`):

    mesh:      {"data": -1} (default: every device data-parallel), or e.g.
               {"fsdp": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2};
               one size may be -1 ("the rest").
    sharding:  trained / frozen / reward: a rule set name (`RULE_SETS`: "default" = FSDP
               by size, "unet", "lm" = tensor-parallel blocks + FSDP, "replicate");
               min_size: params with fewer elements are never FSDP-split.

* the **train state** (trained params; the optimizer state and EMA follow them) is
  created already sharded (`create_state`: `jit(TrainState.create, out_shardings=...)`),
  and update steps are jitted with explicit in/out shardings and the state donated
  (`jit_update`), so its layout never drifts and the second step does not recompile;
* **frozen** params (the base / reference model, the VAE and text encoder) and the
  **reward** model's params are placed by their own rules (`put_frozen`, `put_reward`);
* **batches** split their rows over the data-parallel axes (`data`, `fsdp`; `tensor`
  devices share rows). In a multi-process run every process computes the same host
  batch (prompts and keys are functions of seed and step), keeps its own rows and the
  global array is assembled from the slices (`batch`, via
  `jax.make_array_from_process_local_data`);
* results come back to the host with `gather` (the whole array, on every process: for
  rewards, statistics and decoding) or `local_rows` (only this process's rows: for host
  rewards on images, whose results are then `gather_rows`-ed).

With one process and one device all of this is the identity: the same loops run on a
laptop and a pod. The mesh helpers underneath (`make_mesh`, `shard_batch`,
`shard_batch_axes`, `shard_tree`, `replicate`, `use_mesh`, and `split_cpu`, which splits
a CPU host into XLA devices before JAX starts) are module functions here too: the one
device vocabulary of every loop; axis names come from rft.sharding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rft import sharding as S
from rft.sharding import DATA, FSDP

# ------------------------------------------------------------------ meshes and placing
# The mesh helpers every loop shares. The batch dimension is split over the `data` axis
# (`shard_batch`), or over whichever of `data` / `fsdp` the mesh has (`shard_batch_axes`);
# params are replicated (`replicate`) or placed by `rft.sharding` rules (`shard_tree`:
# FSDP / tensor parallelism, optimizer and train state following their params). Never
# pmap.


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
    return jax.device_put(x, NamedSharding(mesh, S.batch_spec(mesh, x.ndim)))
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
  if isinstance(specs_or_rules, S.ShardingRules):
    ref = params if params is not None else getattr(tree, "params", tree)
    specs = S.param_specs(ref, specs_or_rules, mesh)
  elif (jax.tree.structure(specs_or_rules, is_leaf=is_spec) == jax.tree.structure(tree)
        and params is None):
    ref, specs = tree, specs_or_rules
  else:
    ref = params if params is not None else getattr(tree, "params", tree)
    specs = specs_or_rules
  if ref is not tree:
    specs = S.follow_specs(tree, ref, specs)
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


RULE_SETS = {
    "default": S.DEFAULT_RULES,
    "unet": S.UNET_RULES,
    "lm": S.LM_RULES,
    "replicate": S.ShardingRules(default="replicate"),
}
ROLES = ("trained", "frozen", "reward")


def rules_named(name: str, min_size: int | None = None, key: str = "config.sharding") -> S.ShardingRules:
  if name not in RULE_SETS:
    raise ValueError(f"{key}={name!r} is not a rule set; known: {sorted(RULE_SETS)}")
  rules = RULE_SETS[name]
  return rules if min_size is None else rules.replace(min_size=int(min_size))


def to_host(x: Any) -> np.ndarray:
  """A `jax.Array` (or anything array-like) as numpy, whole, on every process."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: Mesh
  trained: S.ShardingRules = S.DEFAULT_RULES
  frozen: S.ShardingRules = S.DEFAULT_RULES
  reward: S.ShardingRules = RULE_SETS["replicate"]

  # ------------------------------------------------------------------ construction

  @classmethod
  def from_config(cls, config, devices=None, **defaults: str) -> "Placement":
    """From `config.mesh` and `config.sharding` (either may be absent: data-parallel over
    every device, rules `defaults` or "default" / "default" / "replicate")."""
    axes = dict(config.get("mesh") or {DATA: -1})
    unknown = [a for a in axes if a not in S.KNOWN_AXES]
    if unknown:
      raise ValueError(f"config.mesh names axes {unknown}; use {list(S.KNOWN_AXES)}")
    try:
      mesh = make_mesh(axes, devices)
    except ValueError as e:
      raise ValueError(f"config.mesh: {e}") from e
    sh = dict(config.get("sharding") or {})
    extra = [k for k in sh if k not in ROLES + ("min_size",)]
    if extra:
      raise ValueError(f"config.sharding has unknown keys {extra}; known: "
                       f"{list(ROLES) + ['min_size']}")
    min_size = sh.get("min_size")
    names = {"trained": "default", "frozen": "default", "reward": "replicate", **defaults}
    rules = {r: rules_named(sh.get(r) or names[r], min_size, f"config.sharding.{r}")
             for r in ROLES}
    return cls(mesh, **rules)

  # ------------------------------------------------------------------ sizes

  @property
  def axes(self) -> dict[str, int]:
    return {str(k): int(v) for k, v in self.mesh.shape.items()}

  @property
  def data_parallel(self) -> int:
    """Devices holding different rows: the product of the `data` and `fsdp` sizes."""
    return math.prod(self.axes.get(a, 1) for a in (S.DATA, S.FSDP))

  def check_rows(self, n: int, what: str) -> None:
    """ValueError naming `what` (e.g. a config key) when n rows cannot be split evenly."""
    if n % self.data_parallel:
      raise ValueError(f"{what}={n} rows is not divisible by the {self.data_parallel} "
                       f"data-parallel devices of mesh {self.axes} (data x fsdp); change "
                       f"{what} or config.mesh")

  # ------------------------------------------------------------------ params and state

  def shardings(self, tree: Any, rules: S.ShardingRules, params: Any = None) -> Any:
    """NamedSharding tree for `tree` by `rules` (`tree_shardings`: a state
    or optimizer state follows `params`)."""
    return tree_shardings(tree, rules, self.mesh, params)

  def state_shardings(self, state: Any) -> Any:
    """Shardings of a `TrainState` (or its abstract shapes): trained rules on the params,
    optimizer moments and EMA following them, counters replicated."""
    return self.shardings(state, self.trained, params=state.params)

  def create_state(self, create: Callable[[Any], Any], params: Any) -> Any:
    """`create(params)` (e.g. `lambda p: TrainState.create(p, tx)`) computed with its output
    already sharded: every device only ever materialises its own shards of the optimizer
    state. `params` may be host arrays or placed arrays."""
    shapes = jax.eval_shape(create, params)
    out = self.state_shardings(shapes)
    if jax.process_count() > 1:  # process-local arrays (e.g. fresh LoRA factors) -> host
      params = jax.tree.map(
          lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable
          else np.asarray(x), params)
    params = jax.device_put(params, self.shardings(params, self.trained))
    return jax.jit(create, out_shardings=out)(params)

  def put_frozen(self, params: Any) -> Any:
    return jax.device_put(params, self.shardings(params, self.frozen))

  def put_reward(self, params: Any) -> Any:
    if params is None:
      return None
    return jax.device_put(params, self.shardings(params, self.reward))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def jit_update(self, fn: Callable, state: Any, frozen: Sequence[tuple[int, Any]] = (),
                 num_args: int = 1, static_argnames: Sequence[str] = ()) -> Callable:
    """`jax.jit(fn)` for `fn(state, *args) -> (state, metrics)` with the state's shardings
    fixed in and out (`state_shardings`), the state donated, and the positional args in
    `frozen` ((index, placed tree), e.g. the base params) fixed to their placement. Other
    args (batches, keys) keep the shardings they come with."""
    ins: list[Any] = [None] * num_args
    state_sh = self.state_shardings(state)
    ins[0] = state_sh
    for i, tree in frozen:
      ins[i] = None if tree is None else jax.tree.map(lambda x: x.sharding, tree)
    kw = dict(in_shardings=tuple(ins), out_shardings=(state_sh, self.replicated()),
              donate_argnums=(0,))
    if not static_argnames:
      return jax.jit(fn, **kw)
    # jit takes no keyword arguments with in_shardings: one jit per static value.
    compiled: dict[tuple, Callable] = {}

    def call(*args, **static):
      if sorted(static) != sorted(static_argnames):
        raise TypeError(f"pass exactly the static arguments {list(static_argnames)}, got "
                        f"{sorted(static)}")
      k = tuple(sorted(static.items()))
      if k not in compiled:
        compiled[k] = jax.jit(lambda *a: fn(*a, **static), **kw)
      return compiled[k](*args)
    return call

  # ------------------------------------------------------------------ batches

  def row_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, S.batch_spec(self.mesh, ndim))

  def rows(self, n: int) -> slice:
    """Rows [start, stop) of an n-row global batch this process supplies and holds."""
    if jax.process_count() == 1:
      return slice(0, n)
    from rft import distributed
    return distributed.process_rows(n, self.mesh, S.batch_spec(self.mesh))

  def batch(self, tree: Any, size: int | None = None, strict: bool = True) -> Any:
    """Global arrays from a host batch that every process computed alike: leaves with
    `size` leading rows (all leaves when `size` is None) are split over the data-parallel
    axes, each process supplying its own rows; other leaves are replicated. An
    indivisible row count is a ValueError, or (strict=False) replicated. Arrays already
    on this mesh (e.g. rollout outputs) pass through unchanged."""
    leaves = jax.tree.leaves(tree)
    if size is None:
      size = np.shape(leaves[0])[0] if leaves else 0
    split = size % self.data_parallel == 0
    if not split and strict:
      self.check_rows(size, "batch")
    rows = self.rows(size) if split else None

    devices = set(self.mesh.devices.flat)

    def put(x):
      if isinstance(x, jax.Array) and (not x.is_fully_addressable
                                       or x.sharding.device_set == devices):
        return x  # already a global array on this mesh: no host round trip
      x = np.asarray(x)
      if split and x.ndim and x.shape[0] == size:
        return jax.make_array_from_process_local_data(self.row_sharding(x.ndim), x[rows],
                                                      x.shape)
      return jax.device_put(x, self.replicated())
    return jax.tree.map(put, tree)

  def take_rows(self, tree: Any, idx, strict: bool = True) -> Any:
    """`tree`'s leaves at rows `idx` (a gather of global arrays, one jitted program),
    the result split over the data-parallel axes like `batch` (an indivisible count is a
    ValueError, or with strict=False replicated)."""
    idx = np.asarray(idx)
    split = len(idx) % self.data_parallel == 0
    if not split and strict:
      self.check_rows(len(idx), "minibatch")
    return _take_rows(tree, jax.device_put(idx, self.replicated()), self, split)

  def gather(self, tree: Any) -> Any:
    """Numpy copies of a tree of (global) arrays, whole, on every process."""
    return jax.tree.map(to_host, tree)

  def local_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a row-split global array (all rows in one process)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    r = self.rows(x.shape[0])
    parts = {}
    for s in x.addressable_shards:
      start = s.index[0].start or 0
      parts.setdefault(start, np.asarray(s.data))
    out = np.concatenate([parts[k] for k in sorted(parts)])
    if len(out) != r.stop - r.start:
      raise ValueError(f"local rows of an array of shape {x.shape} sharded "
                       f"{x.sharding}: expected rows {r}, the shards hold {len(out)}")
    return out

  def gather_rows(self, local: np.ndarray) -> np.ndarray:
    """Every process's `local_rows` results, concatenated in row order, on every process."""
    if jax.process_count() == 1:
      return np.asarray(local)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def _take_rows_impl(tree, idx, placement, split):
  # A row permutation moves rows between devices anyway: gather the whole array first
  # (one all-gather, stated, instead of GSPMD's "involuntary full rematerialization").
  out = lambda a: placement.row_sharding(a.ndim) if split else placement.replicated()
  whole = lambda a: jax.lax.with_sharding_constraint(a, placement.replicated())
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(whole(a)[idx], out(a)), tree)


_take_rows = jax.jit(_take_rows_impl, static_argnums=(2, 3))


__all__ = ["Placement", "RULE_SETS", "ROLES", "rules_named", "to_host"]
