"""Reading published PyTorch-format checkpoints without torch: shared by every loader.

* :func:`resolve_model_dir` -- a local folder, or a hub id already in the local HF cache
  (no network is ever used).
* :func:`read_state_dict` -- ``*.safetensors`` (single or sharded with a
  ``*.safetensors.index.json``) as numpy arrays; pickle files (``.bin`` / ``.pt`` /
  ``.pth``) only with ``allow_pickle=True``, through ``torch.load(weights_only=True)``
  and with a warning.
* :func:`convert_state` -- torch state dict -> our params tree, by a per-model key
  function, checked against the model's ``jax.eval_shape`` tree: an unknown key, a
  missing key or a wrong shape is a ValueError naming it.
* :func:`save_folder` -- ``config.json`` + one ``*.safetensors`` file into a folder
  (local or not: a ``gs://`` workdir), what the ``save_*`` exporters write.
* Layout helpers: torch Linear ``[out, in]`` -> flax ``[in, out]`` (:func:`linear`),
  torch Conv2d ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]`` (:func:`conv`).
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Path = Tuple[str, ...]
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


# ----------------------------------------------------------------------------- trees


def path_str(path: Sequence[str]) -> str:
  return "/".join(path)


def flatten(tree, prefix: Path = ()) -> Dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def shapes_of(tree) -> Dict[Path, Tuple[int, ...]]:
  """Flat {path: shape} of a params tree or of its ``jax.eval_shape``."""
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


# ----------------------------------------------------------------------------- layouts


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight ``[out, in]`` -> flax Dense kernel ``[in, out]``."""
  if w.ndim != 2:
    raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
  return w.T


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight ``[O, I, kh, kw]`` -> flax Conv kernel ``[kh, kw, I, O]``.

  A ``[O, I]`` weight (a 1x1 conv saved as Linear, as diffusers does for
  ``proj_in`` / ``proj_out`` with linear projections) is accepted as 1x1.
  """
  if w.ndim == 2:
    w = w[:, :, None, None]
  if w.ndim != 4:
    raise ValueError(f"expected a 4-D Conv2d weight, got shape {tuple(w.shape)}")
  return np.transpose(w, (2, 3, 1, 0))


# ----------------------------------------------------------------------------- locating


def hub_cache_dirs() -> List[str]:
  dirs = []
  if os.environ.get("HF_HUB_CACHE"):
    dirs.append(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
  dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
  out = []
  for d in dirs:
    if d not in out:
      out.append(d)
  return out


# What a hub download fetches: configs, safetensors weights, tokenizer files (vocab /
# merges / sentencepiece), nothing pickled (.bin / .ckpt / .pt stay behind).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


def hub_offline() -> bool:
  """Whether $HF_HUB_OFFLINE turns hub downloads off (huggingface_hub's truthy values)."""
  return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _is_hub_id(name: str) -> bool:
  parts = name.split("/")
  return bool(name) and not name.startswith((".", "/", "~")) and len(parts) <= 2 and all(parts)


def _cached_snapshot(parts: List[str], marker: str, tried: List[str]) -> Optional[str]:
  """A snapshot of hub repo `org/name` in the local HF cache holding `marker`: the one
  `refs/main` names, else the newest (caches copied without refs)."""
  repo_dir_name = "models--" + "--".join(parts)
  for cache in hub_cache_dirs():
    repo = os.path.join(cache, repo_dir_name)
    tried.append(repo)
    snapshots = os.path.join(repo, "snapshots")
    if not os.path.isdir(snapshots):
      continue
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
      with open(ref) as f:
        rev = f.read().strip()
      snap = os.path.join(snapshots, rev)
      if os.path.exists(os.path.join(snap, marker)):
        return snap
      tried.append(snap)
      logging.warning("resolve_model_dir: %s names snapshot %s, which lacks %s; "
                      "falling back to the newest snapshot with it", ref, rev, marker)
    candidates = [os.path.join(snapshots, s) for s in os.listdir(snapshots)]
    candidates = [c for c in candidates if os.path.exists(os.path.join(c, marker))]
    if candidates:
      return max(candidates, key=os.path.getmtime)
  return None


def resolve_model_dir(name_or_path: Any, *, marker: str = "config.json",
                      expected: str = "config.json and *.safetensors weights",
                      download: Optional[bool] = None) -> str:
  """Returns the folder holding a model: a local folder as it is, or a hub id
  (``org/name``) through the HF cache and ``huggingface_hub``.

  A hub id resolves to its cached snapshot when one holds ``marker`` (``$HF_HUB_CACHE``,
  ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``; the snapshot ``refs/main`` names,
  else the newest), and otherwise is downloaded with ``huggingface_hub.snapshot_download``
  (only ``HUB_PATTERNS``: configs, safetensors, tokenizer files) unless ``download`` is
  False or ``$HF_HUB_OFFLINE`` is set. Raises FileNotFoundError naming the id, every path
  tried, the files ``expected`` and the command that fetches them.
  """
  name = os.fspath(name_or_path)
  if os.path.isdir(name):
    return name
  tried = [os.path.abspath(name)]
  if not _is_hub_id(name):
    raise FileNotFoundError(f"No model found for {name!r}: tried {tried}. Expected a folder "
                            f"with {expected}.")
  parts = name.split("/")
  snap = _cached_snapshot(parts, marker, tried)
  if snap is not None:
    return snap
  if download is None:
    download = not hub_offline()
  fetch = f"`hf download {name} --include {' '.join(repr(p) for p in HUB_PATTERNS)}`"
  why = "downloads are off (HF_HUB_OFFLINE is set)" if not download else ""
  if download:
    try:
      from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
      snap = snapshot_download(name, allow_patterns=list(HUB_PATTERNS))
    except Exception as e:  # no network, unknown or gated repo, ...: say which, no retry
      why = f"downloading it failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    else:
      if os.path.exists(os.path.join(snap, marker)):
        return snap
      why = f"the downloaded snapshot {snap} has no {marker}"
  raise FileNotFoundError(
      f"No model found for hub id {name!r}: not in the HF cache (tried {tried}) and {why}. "
      f"Expected a folder with {expected}. Fetch it where the network allows with {fetch} "
      "(then copy the cache, or pass the folder).")


def save_folder(folder: Any, config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                weights_file: str) -> str:
  """Writes ``config.json`` (``config``, indented, keys sorted) and ``weights_file``
  (safetensors of ``state``, metadata ``{"format": "pt"}``) into ``folder``, created when
  absent. The folder may be local or not (``gs://...``: through :mod:`rft.paths`).
  Returns the folder."""
  from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
  from rft import paths  # pylint: disable=g-import-not-at-top
  out = os.fspath(folder)
  paths.makedirs(out)
  paths.write_json(os.path.join(out, "config.json"), dict(config), indent=2, sort_keys=True)
  target = os.path.join(out, weights_file)
  if paths.is_local(out):
    safetensors_np.save_file(dict(state), target, metadata={"format": "pt"})
  else:
    paths.write_bytes(target, safetensors_np.save(dict(state), metadata={"format": "pt"}))
  return out


def read_json(path: str, *, expected: str = "") -> Dict[str, Any]:
  """A JSON file as a dict; errors name the file (and what the folder should hold)."""
  if not os.path.isfile(path):
    hint = f" Expected a folder with {expected}." if expected else ""
    raise FileNotFoundError(f"{path}: no such file.{hint}")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
  return d


# ----------------------------------------------------------------------------- reading


def safetensors_files(model_dir: str, prefix: str = "") -> List[str]:
  """The weight files of a folder: the shards an index names, else every
  ``{prefix}*.safetensors`` file."""
  indexes = sorted(glob.glob(os.path.join(model_dir, f"{prefix}*.safetensors.index.json")))
  if len(indexes) > 1:
    raise ValueError(f"{model_dir}: more than one safetensors index: {indexes}")
  if indexes:
    return index_shards(indexes[0])
  return sorted(glob.glob(os.path.join(model_dir, f"{prefix}*.safetensors")))


def index_shards(index: str) -> List[str]:
  """The shard files a ``*.safetensors.index.json`` names (checked to exist)."""
  with open(index) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index}: no weight_map")
  folder = os.path.dirname(index)
  paths = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
  return paths


def resolve_component_dir(path: Any, subfolder: Optional[str], what: str,
                          expected: str) -> str:
  """The folder holding a diffusers component's ``config.json``: ``path/subfolder`` when
  it has one, else ``path`` itself (a pipeline folder or hub id in the local HF cache,
  or the component's own folder). FileNotFoundError names the paths tried and
  `expected`."""
  try:
    root = resolve_model_dir(path, marker="model_index.json", expected=expected)
  except FileNotFoundError:
    root = resolve_model_dir(path, marker="config.json", expected=expected)
  tried = []
  if subfolder:
    sub = os.path.join(root, subfolder)
    if os.path.isfile(os.path.join(sub, "config.json")):
      return sub
    tried.append(os.path.join(sub, "config.json"))
  if os.path.isfile(os.path.join(root, "config.json")):
    return root
  tried.append(os.path.join(root, "config.json"))
  raise FileNotFoundError(f"No {what} config found for {os.fspath(path)!r}: tried {tried}. "
                          f"Expected {expected}.")


def read_component_weights(model_dir: str, name: str, *, allow_pickle: bool, expected: str,
                           variant: Optional[str] = None) -> Dict[str, np.ndarray]:
  """`read_named_weights` of ``name[.variant]``; a FileNotFoundError naming what was
  looked for and found when there is none."""
  name = name + (f".{variant}" if variant else "")
  state = read_named_weights(model_dir, name, allow_pickle=allow_pickle)
  if state is not None:
    return state
  raise FileNotFoundError(
      f"{model_dir}: no {name}.safetensors (nor {name}.safetensors.index.json, nor "
      f"{name}.bin); found {sorted(os.listdir(model_dir))}. Expected {expected}.")


def read_named_weights(model_dir: str, name: str, *,
                       allow_pickle: bool = False) -> Optional[Dict[str, np.ndarray]]:
  """Exactly ``{name}.safetensors``, else ``{name}.safetensors.index.json``'s shards, else
  ``{name}.bin`` (only with ``allow_pickle``); None when none exists. diffusers folders
  often hold ``.fp16`` variants beside the fp32 file: a prefix glob would take both."""
  single = os.path.join(model_dir, name + ".safetensors")
  if os.path.isfile(single):
    return load_safetensors([single])
  if os.path.isfile(single + ".index.json"):
    return load_safetensors(index_shards(single + ".index.json"))
  pickle = os.path.join(model_dir, name + ".bin")
  if os.path.isfile(pickle):
    return read_weight_file(pickle, allow_pickle=allow_pickle)
  return None


def load_safetensors(paths: Sequence[str]) -> Dict[str, np.ndarray]:
  """The tensors of safetensors files as numpy arrays; bfloat16 ones (HF's usual dtype for
  LMs) are read through ml_dtypes' numpy bfloat16 and upcast to float32. A key in more
  than one file is an error naming it."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  # registers numpy's bfloat16
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state: Dict[str, np.ndarray] = {}
  for p in paths:
    try:
      part = load_file(p)
    except Exception as e:  # safetensors raises its own error types
      raise ValueError(f"{p}: cannot read as safetensors: {e}") from e
    for k, v in part.items():
      if k in state:
        raise ValueError(f"{p}: key {k} appears in more than one weight file")
      state[k] = v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
  return state


def load_pickles(paths: Sequence[str]) -> Dict[str, np.ndarray]:
  """Pickled torch state dicts, with ``weights_only=True`` (no arbitrary objects)."""
  import torch  # pylint: disable=g-import-not-at-top
  state: Dict[str, np.ndarray] = {}
  for p in paths:
    logging.warning("unpickling %s (allow_pickle=True; torch.load weights_only=True)", p)
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
      sd = sd["state_dict"]
    if not isinstance(sd, dict):
      raise ValueError(f"{p}: expected a state dict, got {type(sd).__name__}")
    for k, v in sd.items():
      if not isinstance(v, torch.Tensor):
        raise ValueError(f"{p}: {k} is a {type(v).__name__}, not a tensor")
      v = v.detach().cpu()
      if v.dtype == torch.bfloat16:
        v = v.float()
      if k in state:
        raise ValueError(f"{p}: key {k} appears in more than one weight file")
      state[k] = v.numpy()
  return state


# The config key that sets allow_pickle for the loader running now (set by the loops with
# `pickle_key`), so that a refusal names what the user types: --config.allow_pickle=True.
_PICKLE_KEY: contextvars.ContextVar = contextvars.ContextVar("pickle_key", default=None)


@contextlib.contextmanager
def pickle_key(key: str):
  """Inside this block, pickle refusals name `--config.<key>=True` (e.g. "allow_pickle",
  "reward_options.hpsv2.allow_pickle") instead of the loader argument."""
  token = _PICKLE_KEY.set(key)
  try:
    yield
  finally:
    _PICKLE_KEY.reset(token)


def allow_pickle_hint() -> str:
  """How to allow pickles here: `--config.<key>=True` inside `pickle_key`, else the
  loader argument `allow_pickle=True`."""
  key = _PICKLE_KEY.get()
  return f"--config.{key}=True" if key else "allow_pickle=True"


def read_state_dict(model_dir: str, *, allow_pickle: bool = False, prefix: str = "",
                    expected: str = "*.safetensors weights") -> Dict[str, np.ndarray]:
  """All weights of a folder as ``{torch key: numpy array}``.

  safetensors first; pickle files (``{prefix}*.bin/.pt/.pth/.ckpt``) only when there is
  no safetensors file and ``allow_pickle`` is true, since unpickling can run code.
  """
  files = safetensors_files(model_dir, prefix)
  if files:
    return load_safetensors(files)
  pickles = sorted({p for pat in PICKLE_PATTERNS
                    for p in glob.glob(os.path.join(model_dir, prefix + pat))})
  if not pickles:
    raise FileNotFoundError(f"{model_dir}: no weights (*.safetensors). Expected {expected}")
  if not allow_pickle:
    raise ValueError(
        f"{model_dir}: only pickle weight files ({[os.path.basename(p) for p in pickles]})"
        f"; unpickling can run arbitrary code, so pass {allow_pickle_hint()} to load them "
        "(or convert them to safetensors)")
  return load_pickles(pickles)


def read_weight_file(path: str, *, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """One weight file: ``.safetensors``, or a pickle only with ``allow_pickle``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weight file")
  if path.endswith(".safetensors"):
    return load_safetensors([path])
  if not allow_pickle:
    raise ValueError(f"{path}: a pickle weight file; unpickling can run arbitrary code, so "
                     f"pass {allow_pickle_hint()} to load it (or convert it to safetensors)")
  return load_pickles([path])


# ----------------------------------------------------------------------------- converting

# Expected shape in the checkpoint's own layout, for error messages.
_TORCH_LAYOUT = {linear: lambda s: tuple(s[::-1]),
                 conv: lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s}

KeyFn = Callable[[str], Optional[Tuple[Path, Optional[Callable[[np.ndarray], np.ndarray]]]]]


def convert_state(state: Mapping[str, np.ndarray], convert_key: KeyFn,
                  expected: Mapping[Path, Tuple[int, ...]], *, source: str,
                  ignore: Optional[str] = None, dtype=jnp.float32,
                  describe: Optional[Callable[[Path], str]] = None) -> Dict[str, Any]:
  """torch state dict -> our params tree, checked against ``expected`` shapes.

  ``convert_key(key)`` gives ``(our path, layout fn or None)`` or None for a key the
  model does not know. Keys matching the regex ``ignore`` (buffers such as
  ``position_ids``) are skipped. Raises ValueError naming ``source`` and every unknown
  key, every missing param (with ``describe(path)``, e.g. the torch key it comes from)
  and the first wrong shape (checkpoint shape, converted shape and expected shape).
  """
  ignore_re = re.compile(ignore) if ignore else None
  flat: Dict[Path, Any] = {}
  unexpected = []
  for key, value in state.items():
    if ignore_re is not None and ignore_re.search(key):
      continue
    conv_ = convert_key(key)
    if conv_ is None or conv_[0] not in expected:
      unexpected.append(key)
      continue
    path, fn = conv_
    arr = np.asarray(value)
    try:
      out = fn(arr) if fn is not None else arr
    except ValueError as e:
      raise ValueError(f"{source}: {key} -> {path_str(path)}: {e}") from e
    if tuple(out.shape) != tuple(expected[path]):
      want = tuple(expected[path])
      torch_want = _TORCH_LAYOUT.get(fn, lambda s: s)(want)
      raise ValueError(
          f"{source}: wrong shape for {key} -> {path_str(path)}: checkpoint has "
          f"{tuple(arr.shape)}, the model expects {torch_want} (as {want} after "
          "conversion)")
    if path in flat:
      raise ValueError(f"{source}: two checkpoint keys map to {path_str(path)} (one is {key})")
    flat[path] = out
  if unexpected:
    raise ValueError(
        f"{source}: {len(unexpected)} unexpected key(s), not in the model: "
        f"{sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}")
  missing = [p for p in expected if p not in flat]
  if missing:
    describe = describe or path_str
    names = [f"{describe(p)} (-> {path_str(p)} {tuple(expected[p])})" for p in missing]
    raise ValueError(f"{source}: {len(missing)} missing key(s): {names[:20]}"
                     f"{' ...' if len(names) > 20 else ''}")
  return unflatten({p: jnp.asarray(a, dtype=dtype) for p, a in flat.items()})


def check_tree(params, expected: Mapping[Path, Tuple[int, ...]], who: str) -> Dict[Path, Any]:
  """The flat params after checking them against ``expected`` shapes: a ValueError from
  ``who`` lists missing, unexpected and wrong-shaped params (before writing a file)."""
  flat = flatten(params)
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != dict(expected):
    missing = sorted(path_str(k) for k in expected if k not in got)
    extra = sorted(path_str(k) for k in got if k not in expected)
    bad = sorted(f"{path_str(k)}: {got[k]} != {expected[k]}"
                 for k in got if k in expected and got[k] != expected[k])
    raise ValueError(f"{who}: params do not match the config: missing {missing[:20]}, "
                     f"unexpected {extra[:20]}, wrong shapes {bad[:20]}")
  return flat


def eval_shapes(init_fn: Callable[[], Any]) -> Dict[Path, Tuple[int, ...]]:
  """Flat param shapes of ``init_fn()`` (a ``module.init(...)`` call) without allocating."""
  tree = jax.eval_shape(init_fn)
  if "params" in tree:
    tree = tree["params"]
  return shapes_of(tree)
