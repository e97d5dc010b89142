"""CLIP checkpoints (transformers folders, open_clip state dicts) -> :mod:`rft.models.clip` params.

* :func:`load_clip_text_encoder` -- a ``transformers.CLIPTextModel`` folder
  (``config.json`` + ``model.safetensors``), e.g. an SD pipeline's ``text_encoder/``.
* :func:`load_clip_text_with_projection` -- a ``CLIPTextModelWithProjection`` folder
  (SD3's ``text_encoder`` / ``text_encoder_2``): the text tower + ``text_projection``.
* :func:`load_clip_model` -- a ``transformers.CLIPModel`` folder (PickScore, CLIPScore).
* :func:`load_clip_vision` -- a ``CLIPVisionModelWithProjection`` folder, or the vision
  tower + ``visual_projection`` of a full ``CLIPModel`` folder (the LAION aesthetic
  predictor's ViT-L/14).
* :func:`load_open_clip` -- an ``open_clip.CLIP`` state dict file (HPSv2's
  ``HPS_v2*_compressed.pt`` are pickles, possibly ``{"state_dict": ...}`` with DDP's
  ``module.`` prefix: both are stripped).

Keys convert by renaming (see :mod:`rft.models.clip`)::

  text_model.encoder.layers.3.self_attn.q_proj.weight -> encoder/layers_3/self_attn/q_proj/kernel (T)
  vision_model.embeddings.patch_embedding.weight      -> vision_model/embeddings/patch_embedding/kernel
                                                         ([O, I, kh, kw] -> [kh, kw, I, O])
  *.layer_norm1.weight / *.embedding.weight           -> .../scale, .../embedding
  visual.transformer.resblocks.0.attn.in_proj_weight  -> visual/transformer/resblocks_0/attn/in_proj/kernel (T)
  visual.proj, text_projection (open_clip matrices)   -> as is (``x @ proj``)

Published transformers 4 text encoders prefix keys with ``text_model.``; transformers 5
saves ``CLIPTextModel`` without it: both load. Buffers (``position_ids``,
``attn_mask``) are ignored; every other key must match the model exactly (names and
shapes), else ValueError naming it (``io.convert_state``).

``dtype`` is the returned module's compute dtype; ``param_dtype`` the params' (float32).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                             CLIPTextModelWithProjection, CLIPVisionConfig,
                             CLIPVisionModelWithProjection)
from rft.models.open_clip import OpenCLIPConfig, OpenCLIPModel
from rft.weights import io

__all__ = [
    "load_clip_text_encoder",
    "load_clip_text_with_projection",
    "load_clip_model",
    "load_clip_vision",
    "load_open_clip",
    "torch_key_to_path",
    "path_to_torch_key",
]

_IGNORE = r"(^|\.)(position_ids|attn_mask)$"
_EXPECTED = "config.json and model.safetensors (a transformers {} folder)"


# ----------------------------------------------------------------------------- keys


def torch_key_to_path(key: str, expected: Mapping[io.Path, Tuple[int, ...]]):
  """torch key -> ``(our path, layout fn)`` or None; ``.weight`` becomes ``kernel``
  (Linear transposed, Conv2d to HWIO), ``scale`` or ``embedding``, whichever ``expected``
  has."""
  parts = key.split(".")
  out = []
  i = 0
  while i < len(parts):
    if parts[i] in ("layers", "resblocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  if out[-1] in ("in_proj_weight", "in_proj_bias"):
    out[-1:] = ["in_proj", out[-1][len("in_proj_"):]]
  if out[-1] == "weight":
    for leaf in ("kernel", "scale", "embedding"):
      path = tuple(out[:-1]) + (leaf,)
      if path in expected:
        if leaf != "kernel":
          return path, None
        return path, io.conv if len(expected[path]) == 4 else io.linear
    return None
  return tuple(out), None


def path_to_torch_key(path: io.Path) -> str:
  """Our path -> torch key (inverse of :func:`torch_key_to_path`), for error messages."""
  out = []
  for p in path:
    for stem in ("layers_", "resblocks_"):
      if p.startswith(stem) and p[len(stem):].isdigit():
        p = f"{stem[:-1]}.{p[len(stem):]}"
    out.append(p)
  if len(out) >= 2 and out[-2] == "in_proj":
    out[-2:] = ["in_proj_" + ("weight" if out[-1] == "kernel" else "bias")]
  elif out[-1] in ("kernel", "scale", "embedding"):
    out[-1] = "weight"
  return ".".join(out)


def convert(state: Mapping[str, np.ndarray], expected, *, source: str,
            param_dtype=jnp.float32, prefix: str = "") -> Dict[str, Any]:
  """A torch state dict -> our params (checked against ``expected``); ``prefix`` is
  prepended to the error messages' torch key names."""
  return io.convert_state(
      state, lambda k: torch_key_to_path(k, expected), expected, source=source,
      ignore=_IGNORE, dtype=param_dtype,
      describe=lambda p: prefix + path_to_torch_key(p))


# ----------------------------------------------------------------------------- HF folders


def _resolve(path: Any, subfolder: Optional[str], what: str) -> str:
  expected = _EXPECTED.format(what)
  if subfolder:
    root = io.resolve_model_dir(path, marker=os.path.join(subfolder, "config.json"),
                                expected=f"a {subfolder}/ subfolder with {expected}")
    model_dir = os.path.join(root, subfolder)
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"{model_dir}: no such folder (subfolder={subfolder!r} of "
                              f"{root}). Expected {expected}")
    return model_dir
  return io.resolve_model_dir(path, expected=expected)


def _read(model_dir: str, allow_pickle: bool, what: str):
  expected = _EXPECTED.format(what)
  config = io.read_json(os.path.join(model_dir, "config.json"), expected=expected)
  state = io.read_state_dict(model_dir, allow_pickle=allow_pickle, expected=expected)
  return config, state


def _config(model_dir: str, fn, d):
  try:
    return fn(d)
  except ValueError as e:
    raise ValueError(f"{os.path.join(model_dir, 'config.json')}: {e}") from e


# Dummy inputs for ``io.eval_shapes`` (traced abstractly: nothing is allocated).
def _text_ids(c: CLIPTextConfig):
  return jnp.zeros((1, c.max_position_embeddings), jnp.int32)


def _pixels(c):
  return jnp.zeros((1, c.image_size, c.image_size, getattr(c, "num_channels", 3)),
                   jnp.float32)


def load_clip_text_encoder(path: Any, *, subfolder: Optional[str] = None,
                           allow_pickle: bool = False, dtype=jnp.float32,
                           param_dtype=jnp.float32
                           ) -> Tuple[CLIPTextConfig, CLIPTextModel, Dict[str, Any]]:
  """A ``transformers.CLIPTextModel`` folder -> ``(config, model, params)``.

  Args:
    path: a folder, or a hub id in the local HF cache (``io.resolve_model_dir``), e.g.
      an SD pipeline with ``subfolder="text_encoder"``.
    subfolder: a folder inside ``path`` holding the text encoder.
    allow_pickle: also accept ``pytorch_model.bin`` when there is no safetensors file.
    dtype / param_dtype: compute dtype of the model / dtype of the params.

  Keys with or without the ``text_model.`` prefix load. A full ``CLIPModel`` folder also
  loads (its text tower; the other keys are dropped). ``model.safetensors`` is read by
  name when present, so a ``model.fp16.safetensors`` beside it (hub SD folders) is ignored.
  """
  model_dir = _resolve(path, subfolder, "CLIPTextModel")
  state = io.read_named_weights(model_dir, "model", allow_pickle=allow_pickle)
  if state is None:
    d, state = _read(model_dir, allow_pickle, "CLIPTextModel")
  else:
    d = io.read_json(os.path.join(model_dir, "config.json"),
                     expected=_EXPECTED.format("CLIPTextModel"))
  config = _config(model_dir, CLIPTextConfig.from_hf, d)
  if "text_config" in d:  # a full CLIPModel: keep the text tower
    state = {k: v for k, v in state.items() if k.startswith("text_model.")}
  prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""
  state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
  model = CLIPTextModel(config, dtype=dtype)
  expected = io.eval_shapes(lambda: model.init(jax.random.PRNGKey(0), _text_ids(config)))
  params = convert(state, expected, source=model_dir, param_dtype=param_dtype, prefix=prefix)
  return config, model, params


def load_clip_text_with_projection(path: Any, *, subfolder: Optional[str] = None,
                                   allow_pickle: bool = False, dtype=jnp.float32,
                                   param_dtype=jnp.float32
                                   ) -> Tuple[CLIPTextConfig, CLIPTextModelWithProjection,
                                              Dict[str, Any]]:
  """A ``transformers.CLIPTextModelWithProjection`` folder (SD3's ``text_encoder`` /
  ``text_encoder_2``, SDXL's ``text_encoder_2``) -> ``(config, model, params)``; params
  ``{"text_model": ..., "text_projection": {"kernel"}}``.

  A full ``CLIPModel`` folder also loads (``text_model`` + ``text_projection``; the
  vision keys are dropped). ``model.safetensors`` is read by name, so a
  ``model.fp16.safetensors`` beside it is ignored. Arguments as
  :func:`load_clip_text_encoder`.
  """
  what = "CLIPTextModelWithProjection"
  model_dir = _resolve(path, subfolder, what)
  d = io.read_json(os.path.join(model_dir, "config.json"), expected=_EXPECTED.format(what))
  # model.safetensors by name first: diffusers folders (SD3's) often hold
  # model.fp16.safetensors beside it, which a glob would also take.
  state = io.read_named_weights(model_dir, "model", allow_pickle=allow_pickle)
  if state is None:
    _, state = _read(model_dir, allow_pickle, what)
  config = _config(model_dir, CLIPTextConfig.from_hf, d)
  if "text_config" in d:  # a full CLIPModel: keep the text tower and its projection
    state = {k: v for k, v in state.items()
             if k.startswith("text_model.") or k.startswith("text_projection.")}
  model = CLIPTextModelWithProjection(config, dtype=dtype)
  expected = io.eval_shapes(lambda: model.init(jax.random.PRNGKey(0), _text_ids(config)))
  params = convert(state, expected, source=model_dir, param_dtype=param_dtype)
  return config, model, params


def load_clip_model(path: Any, *, subfolder: Optional[str] = None, allow_pickle: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32
                    ) -> Tuple[CLIPModel, Dict[str, Any]]:
  """A ``transformers.CLIPModel`` folder (PickScore, CLIPScore) -> ``(model, params)``
  (``model.config`` is the :class:`CLIPConfig`)."""
  model_dir = _resolve(path, subfolder, "CLIPModel")
  d, state = _read(model_dir, allow_pickle, "CLIPModel")
  config = _config(model_dir, CLIPConfig.from_hf, d)
  model = CLIPModel(config, dtype=dtype)
  expected = io.eval_shapes(lambda: model.init(
      jax.random.PRNGKey(0), _text_ids(config.text), _pixels(config.vision)))
  params = convert(state, expected, source=model_dir, param_dtype=param_dtype)
  return model, params


def load_clip_vision(path: Any, *, subfolder: Optional[str] = None, allow_pickle: bool = False,
                     dtype=jnp.float32, param_dtype=jnp.float32
                     ) -> Tuple[CLIPVisionModelWithProjection, Dict[str, Any]]:
  """A ``CLIPVisionModelWithProjection`` folder, or a full ``CLIPModel`` folder (its
  ``vision_model`` + ``visual_projection``; text keys dropped) -> ``(model, params)``."""
  model_dir = _resolve(path, subfolder, "CLIPVisionModelWithProjection or CLIPModel")
  d, state = _read(model_dir, allow_pickle, "CLIPVisionModelWithProjection or CLIPModel")
  config = _config(model_dir, CLIPVisionConfig.from_hf, d)
  if "vision_config" in d:
    state = {k: v for k, v in state.items()
             if k.startswith("vision_model.") or k.startswith("visual_projection.")}
  model = CLIPVisionModelWithProjection(config, dtype=dtype)
  expected = io.eval_shapes(lambda: model.init(jax.random.PRNGKey(0), _pixels(config)))
  params = convert(state, expected, source=model_dir, param_dtype=param_dtype)
  return model, params


# ----------------------------------------------------------------------------- open_clip


def open_clip_config(model: Union[str, OpenCLIPConfig, Mapping[str, Any]]) -> OpenCLIPConfig:
  """A built-in name (``"ViT-H-14"``, ``"ViT-L-14"``), an :class:`OpenCLIPConfig`, or an
  open_clip model_config dict."""
  if isinstance(model, OpenCLIPConfig):
    return model
  if isinstance(model, str):
    return OpenCLIPConfig.named(model)
  if isinstance(model, Mapping):
    return OpenCLIPConfig.from_open_clip(model)
  raise TypeError(f"model must be a name, an OpenCLIPConfig or a dict, got {type(model)}")


def _strip_wrappers(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Drops DDP's ``module.`` prefix (when every key has it)."""
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def load_open_clip(weights_file: Any, model: Union[str, OpenCLIPConfig, Mapping[str, Any]]
                   = "ViT-H-14", *, allow_pickle: bool = False, dtype=jnp.float32,
                   param_dtype=jnp.float32) -> Tuple[OpenCLIPModel, Dict[str, Any]]:
  """An ``open_clip.CLIP`` state dict file -> ``(model, params)``.

  Args:
    weights_file: ``.safetensors``; a pickle (``.pt`` / ``.bin``, e.g. HPSv2's
      ``HPS_v2.1_compressed.pt``) only with ``allow_pickle=True`` (loaded with
      ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper and a
      ``module.`` prefix are removed).
    model: the architecture: a built-in name, an :class:`OpenCLIPConfig` or an
      open_clip model_config dict.
  """
  config = open_clip_config(model)
  path = os.fspath(weights_file)
  if os.path.isdir(path):
    raise ValueError(f"{path}: a folder; pass the weight file itself (an open_clip state "
                     "dict, .safetensors or, with allow_pickle=True, .pt / .bin)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weight file (expected an open_clip state "
                            "dict: .safetensors, or .pt / .bin with allow_pickle=True)")
  state = _strip_wrappers(io.read_weight_file(path, allow_pickle=allow_pickle))
  if "logit_scale" in state and np.shape(state["logit_scale"]) == (1,):
    state["logit_scale"] = np.reshape(state["logit_scale"], ())  # nonscalar_logit_scale
  module = OpenCLIPModel(config, dtype=dtype)
  c = config.vision
  expected = io.eval_shapes(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32),
      jnp.zeros((1, config.text.context_length), jnp.int32)))
  params = convert(state, expected, source=path, param_dtype=param_dtype)
  return module, params

