"""Checkpoints (orbax) and small single-file param files (msgpack). No pickle.

* :func:`ensure_workdir` -- create and probe a run directory before any work.
* :class:`Checkpointer` -- a thin wrapper over ``orbax.checkpoint``'s
  ``CheckpointManager``: refuses to save non-finite states, checks a
  checkpoint's tree (keys, shapes, dtypes) against the model's before
  restoring, and restores onto the template's shardings.
* :func:`save_params_file` / :func:`load_params_file` -- one msgpack file
  (``flax.serialization``) for shipping small pretrained params in the repo.
* :func:`tree_mismatches` / :func:`check_tree_matches` / :func:`assert_finite`.

States are arbitrary pytrees: nested dicts, FrozenDicts, flax
``struct.dataclass`` train states, optax states, Python ints, uint32 (or typed)
PRNG keys. They are stored as their ``flax.serialization.to_state_dict``
(nested dicts with string keys), so key paths read like
``params/unet/conv_in/kernel`` and ``opt_state/0/mu/...``.
"""

from __future__ import annotations

import logging as logging_std
import json
import math
import os
import uuid
from typing import Any, List, Optional, Tuple

from absl import logging
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from rft import paths

__all__ = [
    "WorkdirError",
    "CheckpointMismatchError",
    "NonFiniteError",
    "ensure_workdir",
    "tree_mismatches",
    "check_tree_matches",
    "assert_finite",
    "Checkpointer",
    "DamagedCheckpointError",
    "set_aside_after",
    "save_params_file",
    "load_params_file",
]

_MAX_LISTED = 20


class WorkdirError(OSError):
  """The work directory cannot be created or written."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree does not match the model's (keys, shapes, dtypes)."""


class NonFiniteError(ValueError):
  """A tree holds NaN or Inf where finite values are required."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint's files cannot be read (truncated, overwritten or missing items)."""


SET_ASIDE = "_set_aside"  # <checkpoints>_set_aside/<step>: steps moved away by set_aside_after


# ----------------------------------------------------------------------------
# Work directory
# ----------------------------------------------------------------------------


def ensure_workdir(path: Any) -> str:
  """Creates ``path`` (with parents) and checks it is writable.

  Writes and deletes a probe file. Raises :class:`WorkdirError` naming the path
  and the reason. Returns the path as a string. Remote paths (``gs://...``)
  go through ``etils.epath``.
  """
  path_str = os.fspath(path)
  probe_name = f".rft_write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
  if "://" in path_str:
    from etils import epath  # pylint: disable=g-import-not-at-top
    p = epath.Path(path_str)
    try:
      p.mkdir(parents=True, exist_ok=True)
      probe = p / probe_name
      probe.write_text("ok")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      raise WorkdirError(
          f"work directory {path_str!r} is not usable: "
          f"{type(e).__name__}: {e}") from e
    return path_str
  if os.path.exists(path_str) and not os.path.isdir(path_str):
    raise WorkdirError(f"work directory {path_str!r} exists but is not a "
                       "directory")
  try:
    os.makedirs(path_str, exist_ok=True)
  except OSError as e:
    raise WorkdirError(
        f"cannot create work directory {path_str!r}: "
        f"{e.strerror or type(e).__name__}"
        + (f" ({e.filename})" if e.filename and e.filename != path_str else "")
    ) from e
  if not os.path.isdir(path_str):
    raise WorkdirError(f"work directory {path_str!r} exists but is not a "
                       "directory")
  probe = os.path.join(path_str, probe_name)
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"work directory {path_str!r} is not writable: "
        f"{e.strerror or type(e).__name__}") from e
  return path_str


# ----------------------------------------------------------------------------
# Tree comparison and finiteness
# ----------------------------------------------------------------------------


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_shape_dtype(x) -> Tuple[Tuple[int, ...], Optional[np.dtype], bool]:
  """(shape, dtype, is_python_scalar) of an array, abstract array, orbax
  metadata object or Python scalar."""
  if isinstance(x, (bool, int, float, complex)):
    return (), np.asarray(x).dtype, True
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None:
    arr = np.asarray(x)
    return arr.shape, arr.dtype, False
  # orbax ScalarMetadata marks a Python scalar that was saved.
  is_scalar = type(x).__name__ == "ScalarMetadata"
  try:
    dtype = None if dtype is None else (
        dtype if _is_typed_key(x) else np.dtype(dtype))
  except TypeError:
    pass
  return tuple(int(d) for d in shape), dtype, is_scalar


def _kind(dtype) -> str:
  try:
    k = np.dtype(dtype).kind
  except TypeError:
    return str(dtype)
  return {"u": "int", "i": "int", "f": "float", "V": "float", "b": "bool",
          "c": "complex"}.get(k, k)


def _dtypes_match(a, b, scalar: bool) -> bool:
  if a is None or b is None or a == b:
    return True
  if scalar:  # 0-d leaves (step counters, Python scalars): same kind is fine
    return _kind(a) == _kind(b)
  return False


def _flatten(tree) -> List[Tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      serialization.to_state_dict(tree))
  return [(_path_str(p), leaf) for p, leaf in leaves]


def tree_mismatches(target: Any, loaded: Any, *, check_dtype: bool = True
                    ) -> List[str]:
  """Differences between the model's tree ``target`` and ``loaded``.

  Leaves are compared by key path (``a/b/0/c``) and shape (and dtype). Leaves
  may be arrays, ``jax.ShapeDtypeStruct``, orbax metadata or Python scalars.
  Returns messages like ``missing key 'params/w'`` (in target, not loaded),
  ``unexpected key ...`` (loaded only) and
  ``shape mismatch at 'params/w': checkpoint (3, 3) vs model (3, 4)``.
  """
  t = dict(_flatten(target))
  l = dict(_flatten(loaded))
  out = []
  for k in t:
    if k not in l:
      out.append(f"missing key {k!r}")
  for k in l:
    if k not in t:
      out.append(f"unexpected key {k!r}")
  for k, tv in t.items():
    if k not in l:
      continue
    ts, td, tscalar = _leaf_shape_dtype(tv)
    ls, ld, lscalar = _leaf_shape_dtype(l[k])
    if ts != ls:
      out.append(f"shape mismatch at {k!r}: checkpoint {ls} vs model {ts}")
    elif check_dtype and not _dtypes_match(
        td, ld, scalar=(ts == () or tscalar or lscalar)):
      out.append(f"dtype mismatch at {k!r}: checkpoint {ld} vs model {td}")
  return out


def check_tree_matches(target: Any, loaded: Any, what: str, *,
                       check_dtype: bool = True) -> None:
  """Raises :class:`CheckpointMismatchError` if the trees differ."""
  problems = tree_mismatches(target, loaded, check_dtype=check_dtype)
  if not problems:
    return
  shown = problems[:_MAX_LISTED]
  more = len(problems) - len(shown)
  msg = (f"{what} does not match the model: {len(problems)} mismatch(es)\n  "
         + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
  raise CheckpointMismatchError(msg)


@jax.jit
def _all_finite(xs):
  return [jnp.all(jnp.isfinite(x)) for x in xs]


def nonfinite_paths(tree: Any) -> List[str]:
  """Key paths of floating leaves holding NaN or Inf."""
  bad = []
  jax_items = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, float):
      if not math.isfinite(leaf):
        bad.append(_path_str(path))
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or _is_typed_key(leaf) or not jnp.issubdtype(
        dtype, jnp.inexact):
      continue
    if isinstance(leaf, jax.Array):
      jax_items.append((_path_str(path), leaf))
    elif isinstance(leaf, (np.ndarray, np.generic)):
      if not np.all(np.isfinite(leaf)):
        bad.append(_path_str(path))
  if jax_items:
    flags = jax.device_get(_all_finite([x for _, x in jax_items]))
    bad += [p for (p, _), ok in zip(jax_items, flags) if not bool(ok)]
  return bad


def assert_finite(tree: Any, what: str = "tree") -> None:
  """Raises :class:`NonFiniteError` naming the leaves with NaN/Inf.

  Only floating (inexact) leaves are checked.
  """
  bad = nonfinite_paths(tree)
  if bad:
    shown = ", ".join(repr(p) for p in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise NonFiniteError(
        f"{what} holds NaN/Inf at {len(bad)} leaf/leaves: {shown}{more}")


# ----------------------------------------------------------------------------
# Storable form: state dict, typed PRNG keys as their uint32 data
# ----------------------------------------------------------------------------


def _to_storable(tree: Any) -> Any:
  def conv(x):
    if _is_typed_key(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, x)
      return jax.random.key_data(x)
    return x
  return jax.tree_util.tree_map(conv, serialization.to_state_dict(tree))


def _abstract_target(storable_template: Any) -> Any:
  """Restore target: jax arrays -> ShapeDtypeStruct on their sharding."""
  def conv(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.generic):
      return np.asarray(x)
    return x
  return jax.tree_util.tree_map(conv, storable_template)


def _from_storable(template: Any, restored_sd: Any) -> Any:
  template_sd = serialization.to_state_dict(template)

  def conv(orig, x):
    if _is_typed_key(orig):
      impl = (jax.random.key_impl(orig) if isinstance(orig, jax.Array)
              else orig.dtype._impl)  # pylint: disable=protected-access
      return jax.random.wrap_key_data(x, impl=impl)
    if isinstance(orig, np.generic) and isinstance(x, np.ndarray):
      return x.reshape(()).astype(orig.dtype)[()]
    return x
  restored_sd = jax.tree_util.tree_map(conv, template_sd, restored_sd)
  return serialization.from_state_dict(template, restored_sd)


# ----------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------


class Checkpointer:
  """Saves/restores a train state pytree (+ a small JSON dict) with orbax.

  Each step directory holds two items: ``state`` (orbax StandardSave of the
  state dict) and ``metadata`` (JSON). Saves are synchronous.

  Example::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(state)        # template = freshly built state
    ...
    ckpt.save(step, state, {"epoch": epoch})
  """

  def __init__(self, directory: Any, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = ensure_workdir(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        create=True,
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        },
    )

  @property
  def manager(self):
    """The underlying ``orbax.checkpoint.CheckpointManager``."""
    return self._manager

  def latest_step(self) -> Optional[int]:
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> List[int]:
    self._manager.reload()
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(int(step))

  def save(self, step: int, state: Any, metadata: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves ``state`` at ``step``; returns whether a checkpoint was written.

    Raises :class:`NonFiniteError` (nothing written) if a floating leaf holds
    NaN/Inf. ``metadata`` must be JSON-serialisable. Without ``force`` steps
    off ``save_interval_steps`` are skipped.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    assert_finite(state, what=f"state to save at step {step}")
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except TypeError as e:
      raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}"
                      ) from e
    ocp = self._ocp
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_storable(state)),
            metadata=ocp.args.JsonSave(metadata)),
        force=force)
    self._manager.wait_until_finished()
    return bool(saved)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def saved_tree(self, step: Optional[int] = None) -> Any:
    """The saved state's tree of orbax metadata (shape, dtype per leaf)."""
    step = self._resolve_step(step)
    meta = self._manager.item_metadata(step)["state"]
    if meta is None:
      raise FileNotFoundError(
          f"checkpoint {self._step_dir(step)} has no readable 'state' item")
    return getattr(meta, "tree", meta)

  def restore(self, state_template: Any, step: Optional[int] = None
              ) -> Tuple[Any, dict]:
    """Restores ``(state, metadata)`` into the structure of ``state_template``.

    The template may hold concrete arrays (their shardings are used) or
    ``jax.ShapeDtypeStruct`` leaves (with or without sharding); numpy leaves
    restore as numpy, Python scalars as Python scalars. Before reading any
    array the saved tree is compared with the template; a difference raises
    :class:`CheckpointMismatchError` naming the keys and shapes.
    ``step=None`` restores the latest; no checkpoint -> FileNotFoundError.
    """
    step = self._resolve_step(step)
    storable = _to_storable(state_template)
    try:
      saved = self.saved_tree(step)
    except Exception as e:  # pylint: disable=broad-except
      raise self._damaged(step, "the state item", e, state_template) from None
    check_tree_matches(storable, saved, what=f"checkpoint {self._step_dir(step)}")
    try:
      restored = self._read(step, storable)
    except Exception as e:  # pylint: disable=broad-except
      raise self._damaged(step, "the state or metadata item", e, state_template) from None
    state = _from_storable(state_template, restored["state"])
    metadata = restored["metadata"] or {}
    logging.info("Restored checkpoint %s", self._step_dir(step))
    return state, dict(metadata)

  def _read(self, step: int, storable: Any) -> Any:
    ocp = self._ocp
    return self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_target(storable)),
            metadata=ocp.args.JsonRestore()))

  def _intact(self, step: int, state_template: Any) -> bool:
    """Whether checkpoint `step` restores into the template (reads it whole)."""
    try:
      storable = _to_storable(state_template)
      check_tree_matches(storable, self.saved_tree(step), what="")
      self._read(step, storable)
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def _damaged(self, step: int, item: str, error: Exception, state_template: Any
               ) -> DamagedCheckpointError:
    """One message: the damaged step folder and item, the reader's first line, and the
    newest older checkpoint that restores (resumed from only when the user asks)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if len(reason) > 240:
      reason = reason[:240] + "..."
    older = [s for s in sorted(self.all_steps(), reverse=True) if s < step]
    good = next((s for s in older if self._intact(s, state_template)), None)
    if good is None:
      offer = (f"no older checkpoint restores ({len(older)} tried); move {self.directory} "
               "away to start the run over")
    else:
      offer = (f"the newest intact older checkpoint is step {good}: resume from it with "
               f"--resume_step={good} (later steps are moved to "
               f"{self.directory}{SET_ASIDE}/, nothing is deleted)")
    return DamagedCheckpointError(
        f"checkpoint {self._step_dir(step)} is damaged: {item} cannot be read "
        f"({reason}); nothing was restored; {offer}")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _resolve_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint found in {self.directory}")
      return max(steps)
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory} "
          f"(available: {sorted(steps)})")
    return step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def set_aside_after(directory: Any, step: int) -> List[str]:
  """Moves the step folders of checkpoint `directory` after `step` into
  `<directory>_set_aside/` (so the next run resumes from `step`; nothing is deleted).
  `step` must be a checkpoint there. Returns the moved paths. `directory` may be local or
  not (gs://...: there a folder's move is a copy, then a delete)."""
  directory = os.fspath(directory)
  if paths.is_local(directory):
    directory = os.path.abspath(directory)
  ckdir = paths.path(directory)
  steps = sorted(int(d.name) for d in ckdir.iterdir() if d.name.isdigit()) \
      if ckdir.is_dir() else []
  if int(step) not in steps:
    raise FileNotFoundError(f"--resume_step={step}: no checkpoint for step {step} in "
                            f"{directory} (available: {steps or 'none'})")
  moved = []
  aside = paths.path(directory + SET_ASIDE)
  for s in steps:
    if s > int(step):
      dest = aside / str(s)
      if dest.exists():  # set aside before: keep both
        dest = aside / f"{s}.{len(list(aside.iterdir()))}"
      aside.mkdir(parents=True, exist_ok=True)
      (ckdir / str(s)).rename(dest)
      moved.append(os.fspath(dest))
  return moved


# ----------------------------------------------------------------------------
# Single-file params (msgpack)
# ----------------------------------------------------------------------------


def save_params_file(path: Any, tree: Any) -> None:
  """Writes ``tree`` as one msgpack file (flax.serialization), all or nothing
  (:func:`rft.paths.write_bytes`; local or not).

  Refuses non-finite trees (:class:`NonFiniteError`, nothing written).
  """
  path = os.fspath(path)
  assert_finite(tree, what=f"params for {path}")
  state_dict = jax.device_get(_to_storable(tree))
  paths.write_bytes(path, serialization.msgpack_serialize(state_dict))


def load_params_file(path: Any, template: Any = None) -> Any:
  """Reads a file written by :func:`save_params_file`.

  Without ``template`` returns the nested dict of numpy arrays. With one,
  checks keys/shapes/dtypes (:class:`CheckpointMismatchError` naming ``path``)
  and returns the tree in the template's structure (numpy leaves).
  """
  path = os.fspath(path)
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"params file not found: {path}")
  data = paths.path(path).read_bytes()
  try:
    loaded = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a valid msgpack params file: "
                     f"{type(e).__name__}: {e}") from e
  if template is None:
    return loaded
  check_tree_matches(_to_storable(template), loaded, what=path)
  return _from_storable(template, loaded)


class _QuietOrbax(logging_std.Filter):
  """Drop orbax's INFO chatter (dozens of lines per save) from the absl log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


logging_std.getLogger("absl").addFilter(_QuietOrbax())
