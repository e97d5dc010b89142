"""transformers T5 folders -> :mod:`rft.models.t5` params (SD3's ``text_encoder_3``).

:func:`load_t5_encoder` reads ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``; ``pytorch_model.bin`` only with ``allow_pickle``) of a
``T5EncoderModel`` (a ``model.fp16.safetensors`` variant beside it is ignored), or of a full ``T5Model`` / ``T5ForConditionalGeneration`` (its
``decoder.*`` and ``lm_head.*`` keys are dropped; the encoder's are checked). Keys
convert by renaming (see :mod:`rft.models.t5`)::

  shared.weight                                            -> shared/embedding
  encoder.block.0.layer.0.SelfAttention.q.weight           -> encoder/block_0/layer_0/SelfAttention/q/kernel (T)
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                           -> .../relative_attention_bias/embedding
  encoder.block.3.layer.1.DenseReluDense.wi_0.weight       -> encoder/block_3/layer_1/DenseReluDense/wi_0/kernel (T)
  encoder.block.3.layer.1.layer_norm.weight                -> encoder/block_3/layer_1/layer_norm/scale

The input embedding is tied: ``encoder.embed_tokens.weight`` is ``shared.weight``.
Checkpoints hold either or both (transformers 4 saved both, 5 saves ``shared``); with
both, ``shared.weight`` is used (it is what transformers ties to) and a different
``encoder.embed_tokens.weight`` is a ValueError. Every other key must match the model
exactly, else ValueError naming it (``io.convert_state``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.t5 import T5Config, T5EncoderModel
from rft.weights import io

__all__ = ["load_t5_encoder", "convert_t5_state", "torch_key_to_path", "path_to_torch_key"]

_EXPECTED = ("config.json and model.safetensors (or a model.safetensors.index.json with its "
             "shards) of a transformers T5EncoderModel / T5 folder")
_SHARED = "shared.weight"
_EMBED = "encoder.embed_tokens.weight"
_NUMBERED = ("block", "layer")
_DROP = ("decoder.", "lm_head.")


def torch_key_to_path(key: str, expected: Mapping[io.Path, Tuple[int, ...]]):
  """torch key -> ``(our path, layout fn)`` or None; ``.weight`` becomes ``kernel``
  (transposed), ``scale`` or ``embedding``, whichever ``expected`` has."""
  parts = key.split(".")
  out = []
  i = 0
  while i < len(parts):
    if parts[i] in _NUMBERED and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  if out[-1] != "weight":
    return None
  for leaf in ("kernel", "scale", "embedding"):
    path = tuple(out[:-1]) + (leaf,)
    if path in expected:
      return path, io.linear if leaf == "kernel" else None
  return None


def path_to_torch_key(path: io.Path) -> str:
  """Our path -> torch key (inverse of :func:`torch_key_to_path`), for error messages."""
  out = []
  for p in path[:-1]:
    stem, _, num = p.rpartition("_")
    out.append(f"{stem}.{num}" if stem in _NUMBERED and num.isdigit() else p)
  return ".".join(out + ["weight"])


def convert_t5_state(state: Mapping[str, np.ndarray], expected, *, source: str,
                     param_dtype=jnp.float32) -> Dict[str, Any]:
  """A T5 state dict -> encoder params checked against ``expected`` (decoder / lm_head
  keys dropped, the tied input embedding resolved)."""
  state = {k: v for k, v in state.items() if not k.startswith(_DROP)}
  if _EMBED in state:
    embed = state.pop(_EMBED)
    if _SHARED not in state:
      state[_SHARED] = embed
    elif (np.shape(embed) != np.shape(state[_SHARED])
          or not np.array_equal(np.asarray(embed), np.asarray(state[_SHARED]))):
      raise ValueError(f"{source}: {_EMBED} differs from {_SHARED}; T5EncoderModel ties "
                       "them, so a checkpoint must hold one table")
  return io.convert_state(state, lambda k: torch_key_to_path(k, expected), expected,
                          source=source, dtype=param_dtype, describe=path_to_torch_key)


def _resolve(path: Any, subfolder: Optional[str]) -> str:
  if subfolder:
    root = io.resolve_model_dir(path, marker=os.path.join(subfolder, "config.json"),
                                expected=f"a {subfolder}/ subfolder with {_EXPECTED}")
    model_dir = os.path.join(root, subfolder)
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"{model_dir}: no such folder (subfolder={subfolder!r} of "
                              f"{root}). Expected {_EXPECTED}")
    return model_dir
  return io.resolve_model_dir(path, expected=_EXPECTED)


def load_t5_encoder(path: Any, *, subfolder: Optional[str] = None, allow_pickle: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32
                    ) -> Tuple[T5Config, T5EncoderModel, Dict[str, Any]]:
  """A transformers T5 folder -> ``(config, model, params)``.

  Args:
    path: a folder, or a hub id (cached or downloaded: ``io.resolve_model_dir``), e.g.
      an SD3 pipeline with ``subfolder="text_encoder_3"``.
    subfolder: a folder inside ``path`` holding the encoder.
    allow_pickle: also accept ``pytorch_model.bin`` when there is no safetensors file.
    dtype / param_dtype: compute dtype of the model / dtype of the params.
  """
  model_dir = _resolve(path, subfolder)
  config_path = os.path.join(model_dir, "config.json")
  d = io.read_json(config_path, expected=_EXPECTED)
  try:
    config = T5Config.from_transformers(d)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  # model.safetensors (or its index) by name first: diffusers folders often hold
  # model.fp16.safetensors beside it, which a glob would also take.
  state = io.read_named_weights(model_dir, "model", allow_pickle=allow_pickle)
  if state is None:
    state = io.read_state_dict(model_dir, allow_pickle=allow_pickle, expected=_EXPECTED)
  model = T5EncoderModel(config, dtype=dtype)
  expected = io.eval_shapes(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
  params = convert_t5_state(state, expected, source=model_dir, param_dtype=param_dtype)
  return config, model, params
