"""Hugging Face (torch) causal LM checkpoints <-> :class:`rft.models.lm.DecoderLM` params.

* :func:`resolve_model_dir` -- a local folder, or a hub id (the HF cache's snapshot,
  else downloaded; io.resolve_model_dir).
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

import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.lm import DecoderLM, LMConfig
from rft.weights import io

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
_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_LAYER_RE = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_LAYER_NORM_RE = re.compile(
    r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def resolve_model_dir(name_or_path: Any) -> str:
  """A local folder, or a hub id (cached or downloaded;
  :func:`rft.weights.io.resolve_model_dir`)."""
  return io.resolve_model_dir(name_or_path, expected=_EXPECTED_FILES)


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


def expected_shapes(config: LMConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our param paths -> shapes, from ``jax.eval_shape`` of ``DecoderLM.init``."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  shapes = jax.eval_shape(
      lambda t, p, m: DecoderLM(config).init(jax.random.PRNGKey(0), t, p, m),
      tokens, tokens, mask)["params"]
  return {k: tuple(v.shape) for k, v in io.flatten(shapes).items()}


def hf_to_params(config: LMConfig, state: Dict[str, np.ndarray], *,
                 dtype=jnp.float32, source: str = "checkpoint") -> Dict[str, Any]:
  """Converts a torch-format state dict (numpy arrays) to our params tree.

  Raises ValueError on an unknown key, a missing key or a wrong shape (naming the key,
  the shape found and the shape expected). With ``tie_word_embeddings``, a
  ``lm_head.weight`` equal to the embedding is dropped; a different one is an error.
  Rotary ``inv_freq`` buffers are ignored.
  """
  state = dict(state)
  if config.tie_word_embeddings and "lm_head.weight" in state:
    value = state.pop("lm_head.weight")
    emb = state.get("model.embed_tokens.weight")
    if not (emb is not None and emb.shape == value.shape
            and np.array_equal(np.asarray(emb), np.asarray(value))):
      raise ValueError(
          f"{source}: tie_word_embeddings is true but lm_head.weight "
          f"{tuple(value.shape)} differs from model.embed_tokens.weight "
          f"{None if emb is None else tuple(emb.shape)}")

  def key_fn(key):
    conv = _convert_key(key)
    if conv is None:
      return None
    path, transpose = conv
    return path, (io.linear if transpose else None)

  return io.convert_state(state, key_fn, expected_shapes(config), source=source,
                          ignore=_IGNORED_RE.pattern, dtype=dtype, describe=_to_hf_key)


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
    raise ValueError(f"unknown param path {io.path_str(path)}")
  n = layer[len("layers_"):]
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(("model", "layers", n) + tuple(path[1:-1]) + (leaf,))


def params_to_hf(params) -> Dict[str, np.ndarray]:
  """Our params tree -> torch-format state dict (numpy, Linear weights transposed)."""
  out = {}
  for path, v in io.flatten(params).items():
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
  d = io.read_json(path, expected=_EXPECTED_FILES)
  try:
    return LMConfig.from_hf(d)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def load_lm(path: Any, *, allow_pickle: bool = False,
            dtype=jnp.float32) -> Tuple[LMConfig, Dict[str, Any]]:
  """Loads a Llama / Qwen2 / Qwen3 HF checkpoint: ``(LMConfig, params)``.

  Args:
    path: a local folder or a hub id (cached or downloaded; see
      :func:`resolve_model_dir`).
    allow_pickle: also accept ``pytorch_model*.bin`` / ``*.pt`` / ``*.pth`` (loaded with
      ``torch.load(weights_only=True)``) when the folder has no safetensors file.
    dtype: the params' dtype (float32 by default, whatever the file stores).
  """
  model_dir = resolve_model_dir(path)
  config = _read_config(model_dir)
  state = io.read_state_dict(model_dir, allow_pickle=allow_pickle,
                             expected=f"a folder with {_EXPECTED_FILES}")
  params = hf_to_params(config, state, dtype=dtype, source=model_dir)
  return config, params


def save_lm(path: Any, config: LMConfig, params) -> str:
  """Writes ``config.json`` + ``model.safetensors`` (HF layout; loads with
  :func:`load_lm` and with ``transformers``' ``from_pretrained``). Returns the folder.

  Refuses params whose tree does not match ``config`` or that hold NaN / Inf.
  """
  io.check_tree(params, expected_shapes(config), "save_lm")
  state = params_to_hf(params)
  for k, v in state.items():
    if not np.all(np.isfinite(v.astype(np.float32))):
      raise ValueError(f"save_lm: {k} holds NaN or Inf; not writing {path}")
  d = config.to_hf()
  dtypes = {str(v.dtype) for v in state.values()}
  if len(dtypes) == 1:
    d["dtype"] = d["torch_dtype"] = dtypes.pop()
  return io.save_folder(path, d, state, "model.safetensors")


def load_tokenizer(path: Any):
  """``transformers.AutoTokenizer.from_pretrained`` on the resolved folder."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "load_tokenizer needs the `transformers` package (pip install transformers); "
        "rft uses only its tokenizers, not its models") from e
  return transformers.AutoTokenizer.from_pretrained(resolve_model_dir(path))
