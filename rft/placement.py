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
laptop and a pod.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rft import parallel
from rft import sharding as S

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
    axes = dict(config.get("mesh") or {parallel.DATA: -1})
    unknown = [a for a in axes if a not in S.KNOWN_AXES]
    if unknown:
      raise ValueError(f"config.mesh names axes {unknown}; use {list(S.KNOWN_AXES)}")
    try:
      mesh = parallel.make_mesh(axes, devices)
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
    """NamedSharding tree for `tree` by `rules` (`rft.parallel.tree_shardings`: a state
    or optimizer state follows `params`)."""
    return parallel.tree_shardings(tree, rules, self.mesh, params)

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
