"""Hugging Face (torch) causal LM checkpoints <-> :class:`rft.models.lm.DecoderLM` params.

* :func:`resolve_model_dir` -- a local folder, or a hub id found in the local HF cache
  (no network).
* :func:`load_lm` -- ``config.json`` + ``*.safetensors`` (single file or sharded with
  ``model.safetensors.index.json``) -> ``(LMConfig, params)``. Pickle files
  (``pytorch_model.bin``, ``*.pt``, ``*.pth``) only with ``allow_pickle=True``.
* :func:`save_lm` -- the inverse: ``config.json`` + ``model.safetensors`` that
  ``transformers`` loads with ``AutoModelForCausalLM.from_pretrained``.
* :func:`load_tokenizer` -- ``transformers.AutoTokenizer`` on the same folder.

Conversion is a rename plus a transpose of Linear weights (torch ``[out, in]`` ->
flax ``[in, out]``)::

  model.embed_tokens.weight                   -> embed_tokens/embedding
  model.layers.N.self_attn.q_proj.weight      -> layers_N/self_attn/q_proj/kernel (T)
  model.layers.N.self_attn.q_proj.bias        -> layers_N/self_attn/q_proj/bias
  model.layers.N.self_attn.q_norm.weight      -> layers_N/self_attn/q_norm/scale
  model.layers.N.mlp.gate_proj.weight         -> layers_N/mlp/gate_proj/kernel (T)
  model.layers.N.input_layernorm.weight       -> layers_N/input_layernorm/scale
  model.norm.weight                           -> norm/scale
  lm_head.weight                              -> lm_head/kernel (T)

The converted tree is checked against the model's (``jax.eval_shape`` of ``init``):
a missing key, an unexpected key or a wrong shape is a ValueError naming it.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rft.models.lm import DecoderLM, LMConfig

__all__ = [
    "resolve_model_dir",
    "load_lm",
    "save_lm",
    "load_tokenizer",
    "hf_to_params",
    "params_to_hf",
]

_EXPECTED_FILES = ("config.json, model.safetensors (or model.safetensors.index.json with "
                   "its shards), and tokenizer files (tokenizer.json / "
                   "tokenizer_config.json) for load_tokenizer")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_LAYER_RE = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_LAYER_NORM_RE = re.compile(
    r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------
# Locating a model
# ----------------------------------------------------------------------------


def _hub_cache_dirs() -> List[str]:
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


def resolve_model_dir(name_or_path: Any) -> str:
  """Returns the folder holding a model, without touching the network.

  ``name_or_path`` is a local folder, or a hub id (``org/name``) already downloaded
  into the HF cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
  ``~/.cache/huggingface/hub``, layout ``models--org--name/snapshots/<rev>/``; the
  snapshot named by ``refs/main`` when present, else the newest one).

  Raises FileNotFoundError naming every path tried and the files expected.
  """
  name = os.fspath(name_or_path)
  if os.path.isdir(name):
    return name
  tried = [os.path.abspath(name)]
  # Hub ids: "name" or "org/name", no leading "/", ".", "~" and no backslash.
  parts = name.split("/")
  if name and not name.startswith((".", "/", "~")) and len(parts) <= 2 and all(parts):
    repo_dir_name = "models--" + "--".join(parts)
    for cache in _hub_cache_dirs():
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
        if os.path.isdir(snap):
          return snap
        tried.append(snap)
        logging.warning("resolve_model_dir: %s names snapshot %s, which is missing; "
                        "falling back to the newest snapshot with a config.json", ref, rev)
      candidates = [os.path.join(snapshots, s) for s in os.listdir(snapshots)]
      candidates = [c for c in candidates
                    if os.path.isfile(os.path.join(c, "config.json"))]
      if candidates:
        return max(candidates, key=os.path.getmtime)
  raise FileNotFoundError(
      f"No model found for {name!r}: tried {tried}. Expected a folder with "
      f"{_EXPECTED_FILES}. For a hub id, download it first (no network is used "
      "here), e.g. `hf download ORG/NAME`.")


# ----------------------------------------------------------------------------
# Key conversion
# ----------------------------------------------------------------------------


def _convert_key(key: str) -> Optional[Tuple[Tuple[str, ...], bool]]:
  """torch key -> (our path, transpose?), or None when the key is unknown."""
  if key == "model.embed_tokens.weight":
    return ("embed_tokens", "embedding"), False
  if key == "model.norm.weight":
    return ("norm", "scale"), False
  if key == "lm_head.weight":
    return ("lm_head", "kernel"), True
  m = _LAYER_NORM_RE.match(key)
  if m:
    return (f"layers_{m.group(1)}", m.group(2), "scale"), False
  m = _LAYER_RE.match(key)
  if m:
    layer, block, mod, kind = m.groups()
    if re.fullmatch(_LINEAR, mod):
      if (block == "mlp") != (mod in ("gate_proj", "up_proj", "down_proj")):
        return None
      if kind == "weight":
        return (f"layers_{layer}", block, mod, "kernel"), True
      return (f"layers_{layer}", block, mod, "bias"), False
    if block == "self_attn" and mod in ("q_norm", "k_norm") and kind == "weight":
      return (f"layers_{layer}", block, mod, "scale"), False
  return None


def _path_str(path) -> str:
  return "/".join(path)


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def expected_shapes(config: LMConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our param paths -> shapes, from ``jax.eval_shape`` of ``DecoderLM.init``."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  shapes = jax.eval_shape(
      lambda t, p, m: DecoderLM(config).init(jax.random.PRNGKey(0), t, p, m),
      tokens, tokens, mask)["params"]
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def hf_to_params(config: LMConfig, state: Dict[str, np.ndarray], *,
                 dtype=jnp.float32, source: str = "checkpoint") -> Dict[str, Any]:
  """Converts a torch-format state dict (numpy arrays) to our params tree.

  Raises ValueError on an unknown key, a missing key or a wrong shape (naming the key,
  the shape found and the shape expected). With ``tie_word_embeddings``, a
  ``lm_head.weight`` equal to the embedding is dropped; a different one is an error.
  Rotary ``inv_freq`` buffers are ignored.
  """
  expected = expected_shapes(config)
  flat: Dict[Tuple[str, ...], np.ndarray] = {}
  origin: Dict[Tuple[str, ...], str] = {}
  unexpected = []
  for key, value in state.items():
    if _IGNORED_RE.search(key):
      continue
    if key == "lm_head.weight" and config.tie_word_embeddings:
      emb = state.get("model.embed_tokens.weight")
      if emb is not None and emb.shape == value.shape and np.array_equal(
          np.asarray(emb), np.asarray(value)):
        continue
      raise ValueError(
          f"{source}: tie_word_embeddings is true but lm_head.weight "
          f"{tuple(value.shape)} differs from model.embed_tokens.weight "
          f"{None if emb is None else tuple(emb.shape)}")
    conv = _convert_key(key)
    if conv is None or conv[0] not in expected:
      unexpected.append(key)
      continue
    path, transpose = conv
    arr = np.asarray(value)
    if transpose:
      if arr.ndim != 2:
        raise ValueError(f"{source}: {key} has shape {tuple(arr.shape)}; expected a 2-D "
                         f"Linear weight for {_path_str(path)} {expected[path]} "
                         "(transposed)")
      arr = arr.T
    if tuple(arr.shape) != expected[path]:
      want = expected[path][::-1] if transpose else expected[path]
      raise ValueError(
          f"{source}: wrong shape for {key} -> {_path_str(path)}: checkpoint has "
          f"{tuple(value.shape)}, the model expects {tuple(want)}")
    flat[path] = arr
    origin[path] = key
  if unexpected:
    raise ValueError(
        f"{source}: unexpected key(s) not in the {config.model_type} model: "
        f"{sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}")
  missing = [p for p in expected if p not in flat]
  if missing:
    names = [f"{_to_hf_key(p)} (-> {_path_str(p)} {expected[p]})" for p in missing]
    raise ValueError(f"{source}: missing key(s): {names[:20]}"
                     f"{' ...' if len(names) > 20 else ''}")
  return _unflatten({p: jnp.asarray(a, dtype=dtype) for p, a in flat.items()})


def _to_hf_key(path: Tuple[str, ...]) -> str:
  """Our path -> torch key (inverse of :func:`_convert_key`)."""
  if path == ("embed_tokens", "embedding"):
    return "model.embed_tokens.weight"
  if path == ("norm", "scale"):
    return "model.norm.weight"
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  layer = path[0]
  if not layer.startswith("layers_"):
    raise ValueError(f"unknown param path {_path_str(path)}")
  n = layer[len("layers_"):]
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(("model", "layers", n) + tuple(path[1:-1]) + (leaf,))


def params_to_hf(params) -> Dict[str, np.ndarray]:
  """Our params tree -> torch-format state dict (numpy, Linear weights transposed)."""
  out = {}
  for path, v in _flatten(params).items():
    arr = np.asarray(jax.device_get(v))
    if path[-1] == "kernel":
      arr = arr.T
    out[_to_hf_key(path)] = np.ascontiguousarray(arr)
  return out


# ----------------------------------------------------------------------------
# Reading and writing folders
# ----------------------------------------------------------------------------


def _read_config(model_dir: str) -> LMConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{model_dir}: no config.json. Expected a folder with {_EXPECTED_FILES}")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e
  try:
    return LMConfig.from_hf(d)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def _safetensors_files(model_dir: str) -> List[str]:
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()))
    paths = [os.path.join(model_dir, name) for name in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
    return paths
  return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def _load_safetensors(paths: List[str]) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state: Dict[str, np.ndarray] = {}
  for p in paths:
    for k, v in load_file(p).items():
      if k in state:
        raise ValueError(f"{p}: key {k} appears in more than one weight file")
      state[k] = v
  return state


def _load_pickles(paths: List[str]) -> Dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  state: Dict[str, np.ndarray] = {}
  for p in paths:
    logging.warning("load_lm: unpickling %s (allow_pickle=True; weights_only=True)", p)
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


def load_lm(path: Any, *, allow_pickle: bool = False,
            dtype=jnp.float32) -> Tuple[LMConfig, Dict[str, Any]]:
  """Loads a Llama / Qwen2 / Qwen3 HF checkpoint: ``(LMConfig, params)``.

  Args:
    path: a local folder or a hub id in the local HF cache (see
      :func:`resolve_model_dir`).
    allow_pickle: also accept ``pytorch_model*.bin`` / ``*.pt`` / ``*.pth`` (loaded with
      ``torch.load(weights_only=True)``) when the folder has no safetensors file.
    dtype: the params' dtype (float32 by default, whatever the file stores).
  """
  model_dir = resolve_model_dir(path)
  config = _read_config(model_dir)
  files = _safetensors_files(model_dir)
  if files:
    state = _load_safetensors(files)
  else:
    pickles = sorted({p for pat in _PICKLE_PATTERNS
                      for p in glob.glob(os.path.join(model_dir, pat))})
    if not pickles:
      raise FileNotFoundError(
          f"{model_dir}: no weights (*.safetensors or model.safetensors.index.json). "
          f"Expected a folder with {_EXPECTED_FILES}")
    if not allow_pickle:
      raise ValueError(
          f"{model_dir}: only pickle weight files ({[os.path.basename(p) for p in pickles]})"
          "; unpickling can run arbitrary code, so pass allow_pickle=True to load them "
          "(or convert them to safetensors)")
    state = _load_pickles(pickles)
  params = hf_to_params(config, state, dtype=dtype, source=model_dir)
  return config, params


def save_lm(path: Any, config: LMConfig, params) -> str:
  """Writes ``config.json`` + ``model.safetensors`` (HF layout; loads with
  :func:`load_lm` and with ``transformers``' ``from_pretrained``). Returns the folder.

  Refuses params whose tree does not match ``config`` or that hold NaN / Inf.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  expected = expected_shapes(config)
  flat = _flatten(params)
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != expected:
    missing = sorted(_path_str(k) for k in expected if k not in got)
    extra = sorted(_path_str(k) for k in got if k not in expected)
    bad = sorted(f"{_path_str(k)}: {got[k]} != {expected[k]}"
                 for k in got if k in expected and got[k] != expected[k])
    raise ValueError(f"save_lm: params do not match the config: missing {missing}, "
                     f"unexpected {extra}, wrong shapes {bad}")
  state = params_to_hf(params)
  for k, v in state.items():
    if not np.all(np.isfinite(v.astype(np.float32))):
      raise ValueError(f"save_lm: {k} holds NaN or Inf; not writing {path}")
  out = os.fspath(path)
  os.makedirs(out, exist_ok=True)
  d = config.to_hf()
  dtypes = {str(v.dtype) for v in state.values()}
  if len(dtypes) == 1:
    d["dtype"] = d["torch_dtype"] = dtypes.pop()
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  return out


def load_tokenizer(path: Any):
  """``transformers.AutoTokenizer.from_pretrained`` on the resolved folder."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load_tokenizer needs the `transformers` package (pip install transformers); "
        "rft uses only its tokenizers, not its models") from e
  return transformers.AutoTokenizer.from_pretrained(resolve_model_dir(path))
