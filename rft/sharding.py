"""Sharding rules: which mesh axes each parameter (and its optimizer state) is split over.

A :class:`ShardingRules` is an ordered list of ``(regex, spec)`` pairs matched
(``re.search``, first match wins, then ``default``) against a param's ``"a/b/c"`` path.
A spec is

* a tuple like a ``PartitionSpec``: one entry per leading dim, each ``None``, a mesh-axis
  name or a tuple of names (missing trailing entries are ``None``);
* ``"fsdp"``: ZeRO-3 / FSDP (Rajbhandari et al. 2020, arXiv:1910.02054): the *largest*
  dim divisible by the ``fsdp`` axis size is split over ``fsdp`` when the param has at
  least ``min_size`` elements; otherwise (small, or nothing divides) it is replicated;
* ``"replicate"``.

With ``combine_fsdp`` (default) a tuple spec that does not name the ``fsdp`` axis is
additionally FSDP-sharded on its largest *unsplit* dim (same size/divisibility rule), so a
tensor-parallel weight is split over ``tensor`` on one dim and over ``fsdp`` on another.

Axes a rule names but the mesh lacks count as size 1 (the entry is dropped): the same
rules serve a ``data=8`` mesh (all replicated), ``fsdp=8`` and ``fsdp=4 x tensor=2``.
An explicit entry whose axes do not divide its dim is a ValueError naming the param
path, its shape and the mesh axes; with ``on_indivisible="replicate"`` that dim is
replicated instead, with a logged warning.

Built-in rule sets:

* :data:`LM_RULES` -- Megatron-LM tensor parallelism (Shoeybi et al. 2019,
  arXiv:1909.08053) for ``rft.models.lm.DecoderLM``: column-parallel q/k/v/gate/up
  (output dim over ``tensor``), row-parallel o/down (input dim), embedding and lm_head
  split over the vocabulary; everything else FSDP.
* :data:`UNET_RULES` -- the same for the transformer blocks of
  ``rft.models.sd_unet.UNet2DCondition``: attention ``to_q/to_k/to_v`` (output dim) and
  ``to_out_0`` (input dim), GEGLU ``ff/net_0/proj`` (output dim) and ``ff/net_2`` (input
  dim); everything else (convs, norms, projections) FSDP over ``fsdp`` x ``tensor``, so
  on fsdp4 x tensor2 the convs are split 8 ways, as on fsdp8.
* :data:`DEFAULT_RULES` -- FSDP by size for anything (t2i models, LoRA trees).

Specs are only placement: under ``jit`` any sharding computes the same function (GSPMD
inserts the collectives), so the rules trade memory and communication, never results.

    mesh = placement.make_mesh({"fsdp": 4, "tensor": 2})
    params = init_sharded(lambda k: model.init(k, x)["params"], LM_RULES, mesh, key)
    specs = jax.tree.map(lambda a: a.sharding.spec, params)
    opt_sh = opt_state_shardings(tx, params, specs, mesh)

``mesh`` may everywhere be a ``jax.sharding.Mesh``, an ``AbstractMesh`` or a plain
``{axis: size}`` dict where no device placement is needed (specs, byte counts), so
memory plans for large meshes need no devices.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = [
    "ShardingRules", "LM_RULES", "UNET_RULES", "DEFAULT_RULES", "KNOWN_AXES",
    "param_specs", "param_shardings", "init_sharded", "follow_specs", "opt_state_specs",
    "opt_state_shardings", "to_shardings", "batch_spec", "bytes_per_device",
    "measured_bytes_per_device", "leaf_path",
]

log = logging.getLogger(__name__)

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
KNOWN_AXES = (DATA, FSDP, TENSOR)
Spec = Union[str, Sequence[Union[None, str, Sequence[str]]]]


def _axis_sizes(mesh) -> dict[str, int]:
  """``{axis: size}`` of a Mesh / AbstractMesh / mapping."""
  shape = mesh if isinstance(mesh, Mapping) else mesh.shape
  return {str(k): int(v) for k, v in shape.items()}


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _canonical(entries: Sequence[tuple[str, ...]]) -> P:
  """Per-dim axis tuples -> PartitionSpec without trailing Nones."""
  out = [None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in entries]
  while out and out[-1] is None:
    out.pop()
  return P(*out)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Ordered ``(path regex, spec)`` rules; see the module docstring for the spec forms.

  ``min_size``: params with fewer elements are never FSDP-sharded (explicit tuple
  entries still apply). ``fsdp_axis``: the FSDP axis, or a tuple of axes FSDP spans
  (e.g. ``("fsdp", "tensor")``: a param no tensor rule splits is spread over all
  fsdp x tensor devices; the axes a tensor rule already uses are skipped, and when no
  dim divides the whole product, fewer axes are tried). ``on_indivisible``: "raise" or
  "replicate".
  """

  rules: Sequence[tuple[str, Spec]] = ()
  default: Spec = "fsdp"
  min_size: int = 2 ** 18
  fsdp_axis: Union[str, tuple[str, ...]] = FSDP
  combine_fsdp: bool = True
  on_indivisible: str = "raise"

  def __post_init__(self):
    rules = tuple((str(r), self._check_spec(s, r)) for r, s in self.rules)
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "default", self._check_spec(self.default, "<default>"))
    for r, _ in rules:
      try:
        re.compile(r)
      except re.error as e:
        raise ValueError(f"sharding rule {r!r} is not a valid regex: {e}") from e
    if self.on_indivisible not in ("raise", "replicate"):
      raise ValueError(f"on_indivisible must be 'raise' or 'replicate', got "
                       f"{self.on_indivisible!r}")

  @staticmethod
  def _check_spec(spec, rule):
    if isinstance(spec, str):
      if spec not in ("fsdp", "replicate"):
        raise ValueError(f"sharding rule {rule!r}: spec {spec!r} must be 'fsdp', "
                         "'replicate' or a tuple of mesh-axis names / None")
      return spec
    if isinstance(spec, P):
      spec = tuple(spec)
    spec = tuple(spec)
    for e in spec:
      axes = _entry_axes(e)
      if not all(isinstance(a, str) for a in axes):
        raise ValueError(f"sharding rule {rule!r}: bad spec entry {e!r} in {spec}")
    used = [a for e in spec for a in _entry_axes(e)]
    if len(set(used)) != len(used):
      raise ValueError(f"sharding rule {rule!r}: spec {spec} uses a mesh axis twice")
    return spec

  def replace(self, **kw) -> "ShardingRules":
    return dataclasses.replace(self, **kw)

  def match(self, path: str) -> tuple[str, Spec]:
    """``(regex, spec)`` of the first rule matching ``path`` (``"<default>"`` if none)."""
    for r, s in self.rules:
      if re.search(r, path):
        return r, s
    return "<default>", self.default

  def spec_for(self, path: str, shape: Sequence[int], mesh) -> P:
    """The ``PartitionSpec`` of a param at ``path`` with ``shape`` on ``mesh``."""
    sizes = _axis_sizes(mesh)
    unknown = [a for a in self._named_axes() if a not in sizes and a not in KNOWN_AXES]
    if unknown:
      raise ValueError(f"sharding rules name mesh axes {unknown} that are neither in the "
                       f"mesh {sizes} nor known axes {KNOWN_AXES}")
    shape = tuple(int(d) for d in shape)
    rule, spec = self.match(path)
    where = f"param {path!r} (shape {shape}, rule {rule!r}, mesh axes {sizes})"
    entries: list[tuple[str, ...]] = [()] * len(shape)
    if spec == "replicate":
      return P()
    fsdp = spec == "fsdp"
    if not fsdp:
      if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {spec} has more entries than the param has dims")
      for i, e in enumerate(spec):
        axes = tuple(a for a in _entry_axes(e) if sizes.get(a, 1) > 1)
        n = math.prod(sizes[a] for a in axes)
        if axes and shape[i] % n:
          msg = (f"{where}: dim {i} of size {shape[i]} is not divisible by mesh axes "
                 f"{axes} (total size {n}) of spec {spec}")
          if self.on_indivisible == "raise":
            raise ValueError(msg)
          log.warning("%s; replicating that dim", msg)
          axes = ()
        entries[i] = axes
      fsdp = self.combine_fsdp and self.fsdp_axes[0] not in {a for e in spec
                                                             for a in _entry_axes(e)}
    if fsdp and math.prod(shape) >= self.min_size:
      used = {a for e in entries for a in e}
      axes = tuple(a for a in self.fsdp_axes if a not in used and sizes.get(a, 1) > 1)
      for k in range(len(axes), 0, -1):  # all FSDP axes, else fewer (dropped from the end)
        n = math.prod(sizes[a] for a in axes[:k])
        free = [i for i in range(len(shape)) if not entries[i] and shape[i] % n == 0]
        if free:
          i = max(free, key=lambda j: (shape[j], -j))  # the largest; the first on ties
          entries[i] = axes[:k]
          break
    return _canonical(entries)

  @property
  def fsdp_axes(self) -> tuple[str, ...]:
    """The axes FSDP splits over, in order (``fsdp_axis`` as a tuple)."""
    return (self.fsdp_axis,) if isinstance(self.fsdp_axis, str) else tuple(self.fsdp_axis)

  def _named_axes(self) -> set[str]:
    specs = [s for _, s in self.rules] + [self.default]
    axes = {a for s in specs if not isinstance(s, str) for e in s for a in _entry_axes(e)}
    return axes


_T = TENSOR
LM_RULES = ShardingRules(rules=(
    (r"self_attn/(q|k|v)_proj/kernel$", (None, _T)),
    (r"self_attn/(q|k|v)_proj/bias$", (_T,)),
    (r"self_attn/o_proj/kernel$", (_T, None)),
    (r"mlp/(gate|up)_proj/kernel$", (None, _T)),
    (r"mlp/down_proj/kernel$", (_T, None)),
    (r"embed_tokens/embedding$", (_T, None)),
    (r"lm_head/kernel$", (None, _T)),
))

# Note: GEGLU's proj output is [hidden | gate]; splitting it over `tensor` puts the halves
# on different devices (correct under GSPMD, one extra exchange; Megatron interleaves).
_BLOCK = r"transformer_blocks_\d+/"
UNET_RULES = ShardingRules(rules=(
    (_BLOCK + r"attn\d+/to_(q|k|v)/kernel$", (None, _T)),
    (_BLOCK + r"attn\d+/to_out_0/kernel$", (_T, None)),
    (_BLOCK + r"ff/net_0/proj/kernel$", (None, _T)),
    (_BLOCK + r"ff/net_0/proj/bias$", (_T,)),
    (_BLOCK + r"ff/net_2/kernel$", (_T, None)),
), fsdp_axis=(FSDP, _T))  # convs and the rest FSDP over fsdp x tensor: all 8 devices of 4x2

DEFAULT_RULES = ShardingRules()


# ----------------------------------------------------------------------------- trees


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_path(path) -> str:
  """A jax key path -> ``"a/b/c"`` (dict keys, attribute names, sequence indices)."""
  return "/".join(_key_str(k) for k in path)


def _is_spec(x) -> bool:
  return isinstance(x, P) or x is None


def param_specs(params_or_shapes: Any, rules: ShardingRules, mesh) -> Any:
  """Tree of ``PartitionSpec`` (same structure as the params) from ``rules``.

  Leaves may be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: rules.spec_for(leaf_path(p), np.shape(x), mesh), params_or_shapes)


def to_shardings(specs: Any, mesh) -> Any:
  """Tree of ``PartitionSpec`` -> tree of ``NamedSharding`` on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, P() if s is None else s), specs,
                      is_leaf=_is_spec)


def param_shardings(params_or_shapes: Any, rules: ShardingRules, mesh) -> Any:
  """Tree of ``NamedSharding``: :func:`param_specs` placed on ``mesh``."""
  return to_shardings(param_specs(params_or_shapes, rules, mesh), mesh)


def init_sharded(init_fn: Callable[..., Any], rules: ShardingRules, mesh, *args) -> Any:
  """``init_fn(*args)`` computed under ``jit`` with the rules' output shardings.

  Shapes come from ``jax.eval_shape``, so each device only ever materialises its own
  shards (no full host or device copy). Values equal the unsharded ``init_fn(*args)``.
  """
  shapes = jax.eval_shape(init_fn, *args)
  return jax.jit(init_fn, out_shardings=param_shardings(shapes, rules, mesh))(*args)


def follow_specs(tree: Any, params_shapes: Any, specs: Any) -> Any:
  """Specs for ``tree`` (optimizer state, train state, grads...) that follow the params.

  A leaf whose key path ends with a param's full path and has that param's shape gets
  the param's spec (the longest such path wins); every other leaf (step counts, scalars,
  anything unmatched) is replicated, ``P()``.
  """
  flat_p = jax.tree_util.tree_flatten_with_path(params_shapes)[0]
  flat_s = jax.tree.leaves(specs, is_leaf=_is_spec)
  if len(flat_p) != len(flat_s):
    raise ValueError(f"follow_specs: {len(flat_p)} params but {len(flat_s)} specs")
  table = {tuple(_key_str(k) for k in p): (tuple(np.shape(x)), s)
           for (p, x), s in zip(flat_p, flat_s)}

  def find(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    shape = tuple(np.shape(leaf))
    for i in range(len(keys)):
      hit = table.get(keys[i:])
      if hit is not None and hit[0] == shape:
        return P() if hit[1] is None else hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(find, tree)


def opt_state_specs(tx, params_shapes: Any, specs: Any) -> Any:
  """Specs of ``tx.init(params)``'s leaves (from ``eval_shape``): Adam's mu/nu follow
  the params (:func:`follow_specs`), counts and other scalars are replicated."""
  state = jax.eval_shape(tx.init, params_shapes)
  return follow_specs(state, params_shapes, specs)


def opt_state_shardings(tx, params_shapes: Any, param_specs: Any, mesh) -> Any:
  """``NamedSharding`` tree for ``tx.init(params)``: see :func:`opt_state_specs`."""
  return to_shardings(opt_state_specs(tx, params_shapes, param_specs), mesh)


def batch_spec(mesh, ndim: int = 1) -> P:
  """Leading (batch) dim over the mesh's data-parallel axes (``data`` and ``fsdp``:
  FSDP devices each see different examples; ``tensor`` devices share them)."""
  sizes = _axis_sizes(mesh)
  axes = tuple(a for a in (DATA, FSDP) if a in sizes)
  return P(axes if axes else None, *([None] * (ndim - 1)))


# ----------------------------------------------------------------------------- memory


def _shard_elems(shape: Sequence[int], spec, sizes: Mapping[str, int]) -> int:
  spec = tuple(spec) if spec is not None else ()
  n = 1
  for i, d in enumerate(shape):
    axes = _entry_axes(spec[i]) if i < len(spec) else ()
    n *= -(-int(d) // math.prod(sizes.get(a, 1) for a in axes))
  return n


def bytes_per_device(tree: Any, specs: Any, mesh) -> int:
  """Bytes each device holds for ``tree`` placed with ``specs``, from shapes only.

  ``specs``: a tree of ``PartitionSpec`` / ``NamedSharding`` matching ``tree``, a
  :class:`ShardingRules` (specs via :func:`param_specs`), or None (replicated). A dim of
  size ``d`` split over axes of total size ``n`` holds ``ceil(d / n)`` per device.
  """
  sizes = _axis_sizes(mesh)
  if isinstance(specs, ShardingRules):
    specs = param_specs(tree, specs, sizes)
  leaves = jax.tree.leaves(tree)
  if specs is None:
    flat_s = [P()] * len(leaves)
  else:
    flat_s = [s.spec if isinstance(s, NamedSharding) else s
              for s in jax.tree.leaves(specs, is_leaf=lambda x: _is_spec(x)
                                       or isinstance(x, NamedSharding))]
  if len(flat_s) != len(leaves):
    raise ValueError(f"bytes_per_device: {len(leaves)} leaves but {len(flat_s)} specs")
  return int(sum(_shard_elems(np.shape(x), s, sizes) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, flat_s)))


def measured_bytes_per_device(tree: Any, per_device: bool = False):
  """Bytes of ``tree``'s ``jax.Array`` leaves actually resident on each device, summed
  from ``addressable_shards``: the maximum over devices, or ``{device: bytes}``."""
  totals: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      totals[s.device] = totals.get(s.device, 0) + int(s.data.nbytes)
  if per_device:
    return totals
  return max(totals.values()) if totals else 0
