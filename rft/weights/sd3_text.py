"""Stable Diffusion 3's text side: three encoders, three tokenizers, and its prompt encoding.

A diffusers SD3 folder (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis") holds::

  text_encoder/    CLIPTextModelWithProjection  (CLIP ViT-L/14 text tower)   tokenizer/
  text_encoder_2/  CLIPTextModelWithProjection  (OpenCLIP bigG text tower)   tokenizer_2/
  text_encoder_3/  T5EncoderModel               (T5 v1.1 XXL)                 tokenizer_3/

:func:`encode_sd3_prompt` is ``StableDiffusion3Pipeline.encode_prompt`` (one image per
prompt)::

  clip_i   = CLIP_i(ids_i, output_hidden_states).hidden_states[-(clip_skip + 2)]
             (default clip_skip=0: the penultimate layer's output, no final LayerNorm)
  clip     = concat([clip_1, clip_2], channels) zero-padded on channels to T5's width
  t5       = T5(ids_3).last_hidden_state                (no attention mask: pads attended)
  prompt_embeds = concat([clip, t5], sequence)          [B, 77 + max_sequence_length, 4096]
  pooled        = concat([text_embeds_1, text_embeds_2]) [B, 768 + 1280]

Both CLIPs are tokenised to ``tokenizer.model_max_length`` (77; the pipeline uses the
first tokenizer's length for both), T5 to ``max_sequence_length`` (diffusers' default
256, at most 512 in its ``check_inputs``), all padded to max length and truncated.
Without T5 (a folder saved with ``text_encoder_3=None``, or ``load_t5=False``) its part is
zeros of width ``joint_attention_dim``, as diffusers does. The negative prompt for
classifier-free guidance is just :func:`encode_sd3_prompt` of ``""`` (diffusers always
uses clip_skip=None for it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.clip import CLIPTextModelWithProjection
from rft.models.t5 import T5EncoderModel
from rft.weights import io

__all__ = ["SD3TextEncoders", "SD3Text", "encode_sd3_prompt", "tokenize_sd3",
           "load_sd3_text", "DEFAULT_MAX_SEQUENCE_LENGTH"]

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' encode_prompt default
EXPECTED = ("model_index.json, text_encoder/ and text_encoder_2/ (CLIPTextModelWithProjection: "
            "config.json + model.safetensors), text_encoder_3/ (T5EncoderModel: same), "
            "tokenizer/, tokenizer_2/ (CLIP tokenizers) and tokenizer_3/ (T5 tokenizer)")
_CLIP_CLASSES = ("CLIPTextModelWithProjection",)
_T5_CLASSES = ("T5EncoderModel",)
_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")
_COMPONENTS = (("text_encoder", _CLIP_CLASSES), ("text_encoder_2", _CLIP_CLASSES),
               ("text_encoder_3", _T5_CLASSES), ("tokenizer", _CLIP_TOKENIZERS),
               ("tokenizer_2", _CLIP_TOKENIZERS), ("tokenizer_3", _T5_TOKENIZERS))
_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass(frozen=True)
class SD3TextEncoders:
  """The three (stateless, hashable) modules; ``t5`` None means "no T5": its states are
  zeros ``[B, L3, joint_attention_dim]``."""

  clip_l: CLIPTextModelWithProjection
  clip_g: CLIPTextModelWithProjection
  t5: Optional[T5EncoderModel]
  joint_attention_dim: int = 4096

  @property
  def t5_width(self) -> int:
    return self.t5.config.d_model if self.t5 is not None else self.joint_attention_dim


def _clip_states(model, params, ids, clip_skip: Optional[int]):
  out = model.apply({"params": params}, ids)
  states = out["hidden_states"]
  k = (clip_skip or 0) + 2
  if k > len(states):
    raise ValueError(f"clip_skip={clip_skip} leaves no hidden state: the CLIP text encoder "
                     f"has {len(states) - 1} layers")
  return states[-k].astype(jnp.float32), out["text_embeds"].astype(jnp.float32)


def encode_sd3_prompt(encoders: SD3TextEncoders, params: Dict[str, Any],
                      tokens: Dict[str, Any], *, clip_skip: Optional[int] = None
                      ) -> Tuple[jax.Array, jax.Array]:
  """diffusers ``StableDiffusion3Pipeline.encode_prompt`` for already tokenised prompts.

  Args:
    encoders: the modules (:class:`SD3TextEncoders`; static under ``jax.jit``).
    params: ``{"text_encoder", "text_encoder_2", "text_encoder_3"}`` (the last may be
      absent when ``encoders.t5`` is None).
    tokens: ``{"clip_l": [B, L] , "clip_g": [B, L], "t5": [B, L3]}`` int ids, as
      :func:`tokenize_sd3` returns (without T5 only the shape of ``"t5"`` is used).
    clip_skip: diffusers' ``clip_skip`` (None: the penultimate CLIP layer).

  Returns:
    ``(prompt_embeds [B, L + L3, t5_width], pooled_prompt_embeds [B, P_l + P_g])`` float32.
  """
  clip_l, pooled_l = _clip_states(encoders.clip_l, params["text_encoder"], tokens["clip_l"],
                                  clip_skip)
  clip_g, pooled_g = _clip_states(encoders.clip_g, params["text_encoder_2"], tokens["clip_g"],
                                  clip_skip)
  if clip_l.shape[:2] != clip_g.shape[:2]:
    raise ValueError(f"clip_l tokens {clip_l.shape[:2]} and clip_g tokens "
                     f"{clip_g.shape[:2]} must have the same [batch, length]")
  t5_ids = jnp.asarray(tokens["t5"])
  if encoders.t5 is None:
    t5 = jnp.zeros(t5_ids.shape + (encoders.joint_attention_dim,), jnp.float32)
  else:
    t5 = encoders.t5.apply({"params": params["text_encoder_3"]}, t5_ids).astype(jnp.float32)
  clip = jnp.concatenate([clip_l, clip_g], axis=-1)
  width = t5.shape[-1]
  if clip.shape[-1] > width:
    raise ValueError(f"the CLIP states ({clip_l.shape[-1]} + {clip_g.shape[-1]} channels) are "
                     f"wider than T5's {width}; diffusers would crop them")
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  prompt_embeds = jnp.concatenate([clip, t5], axis=1)
  pooled = jnp.concatenate([pooled_l, pooled_g], axis=-1)
  return prompt_embeds, pooled


def _ids(tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
  out = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                  add_special_tokens=True, return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)


def clip_max_length(tokenizer) -> int:
  """The pipeline's ``tokenizer_max_length``: the first tokenizer's ``model_max_length``
  (77 when absent or unset)."""
  n = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
  if n is None or n > 10_000:  # transformers' "very large" placeholder when unset
    return 77
  return int(n)


def tokenize_sd3(tokenizers: Sequence[Any], texts: Sequence[str],
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, *,
                 texts_2: Optional[Sequence[str]] = None,
                 texts_3: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
  """Token ids as ``encode_prompt`` makes them: ``{"clip_l", "clip_g"}`` ``[B, 77]`` and
  ``"t5"`` ``[B, max_sequence_length]`` (int32, padded to max length, truncated).

  ``tokenizers`` is ``(tokenizer, tokenizer_2, tokenizer_3)``; ``tokenizer_3`` None gives
  all-zero ``"t5"`` ids (only their shape matters then). ``texts_2`` / ``texts_3`` are
  diffusers' ``prompt_2`` / ``prompt_3`` (default: ``texts``).
  """
  if isinstance(texts, str):
    texts = [texts]
  if len(tokenizers) != 3:
    raise ValueError(f"expected (tokenizer, tokenizer_2, tokenizer_3), got {len(tokenizers)}")
  tok_l, tok_g, tok_t5 = tokenizers
  texts_2 = [texts_2] if isinstance(texts_2, str) else (texts_2 or texts)
  texts_3 = [texts_3] if isinstance(texts_3, str) else (texts_3 or texts)
  if not len(texts) == len(texts_2) == len(texts_3):
    raise ValueError(f"texts, texts_2 and texts_3 have different lengths: {len(texts)}, "
                     f"{len(texts_2)}, {len(texts_3)}")
  n = clip_max_length(tok_l)
  out = {"clip_l": _ids(tok_l, texts, n), "clip_g": _ids(tok_g, texts_2, n)}
  if tok_t5 is None:
    out["t5"] = np.zeros((len(texts), max_sequence_length), np.int32)
  else:
    out["t5"] = _ids(tok_t5, texts_3, max_sequence_length)
  return out


@dataclasses.dataclass
class SD3Text:
  """SD3's loaded text side (see :func:`load_sd3_text`)."""

  encoders: SD3TextEncoders
  params: Dict[str, Any]  # {"text_encoder", "text_encoder_2"[, "text_encoder_3"]}
  tokenizers: Tuple[Any, Any, Any]  # tokenizer_3 None without T5
  configs: Tuple[Any, Any, Any]  # CLIPTextConfig, CLIPTextConfig, T5Config or None
  path: str

  def tokenize(self, texts: Sequence[str],
               max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, **kw):
    return tokenize_sd3(self.tokenizers, texts, max_sequence_length, **kw)

  def encode(self, texts: Sequence[str],
             max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, *,
             clip_skip: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Tokenises and encodes (jitted): ``(prompt_embeds, pooled_prompt_embeds)``."""
    tokens = self.tokenize(texts, max_sequence_length)
    return _jit_encode(self.encoders, clip_skip)(self.params, tokens)


_ENCODE_CACHE: Dict[Any, Any] = {}


def _jit_encode(encoders: SD3TextEncoders, clip_skip: Optional[int]):
  key = (encoders, clip_skip)
  if key not in _ENCODE_CACHE:
    _ENCODE_CACHE[key] = jax.jit(
        lambda p, t: encode_sd3_prompt(encoders, p, t, clip_skip=clip_skip))
  return _ENCODE_CACHE[key]


def _check_index(model_dir: str, load_t5: bool) -> bool:
  """Checks model_index.json; returns whether the folder has T5 (False when the index
  says ``text_encoder_3: [null, null]`` and ``tokenizer_3`` likewise, as
  ``save_pretrained`` of a pipeline built with ``text_encoder_3=None`` writes)."""
  index = io.read_json(os.path.join(model_dir, "model_index.json"), expected=EXPECTED)
  has_t5 = True
  for name, classes in _COMPONENTS:
    entry = index.get(name)
    is_t5 = name.endswith("_3")
    if is_t5 and not load_t5:
      has_t5 = False
      continue
    if entry is None or not isinstance(entry, (list, tuple)) or len(entry) != 2:
      raise ValueError(f"{model_dir}/model_index.json has no {name!r} component; expected "
                       f"{EXPECTED}")
    if entry[-1] is None:
      if is_t5:
        has_t5 = False
        continue
      raise ValueError(f"{model_dir}/model_index.json: component {name!r} is null; SD3 "
                       f"needs it (expected {EXPECTED})")
    if entry[-1] not in classes:
      raise ValueError(f"{model_dir}/model_index.json: {name} is a {entry[-1]}; rft "
                       f"supports {classes}")
    if not os.path.isdir(os.path.join(model_dir, name)):
      raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing component "
                              f"{name!r} (listed in model_index.json); expected {EXPECTED}")
  if not has_t5 and load_t5:
    for name in ("text_encoder_3", "tokenizer_3"):
      entry = index.get(name)
      if entry and entry[-1] is not None:
        raise ValueError(f"{model_dir}/model_index.json: text_encoder_3 / tokenizer_3 must "
                         f"both be present or both null (got {name}={entry})")
  return has_t5


def _joint_attention_dim(model_dir: str, default: int) -> int:
  path = os.path.join(model_dir, "transformer", "config.json")
  if not os.path.isfile(path):
    return default
  return int(io.read_json(path).get("joint_attention_dim", default))


def load_sd3_text(path: Any, *, allow_pickle: bool = False, dtype=jnp.float32,
                  param_dtype=jnp.float32, load_t5: bool = True) -> SD3Text:
  """The three text encoders and tokenizers of a diffusers SD3 folder (or cached hub id).

  ``dtype`` is the modules' compute dtype, ``param_dtype`` the params' (T5-XXL is
  ~19 GB in float32, ~9.5 GB in bfloat16). ``load_t5=False`` skips
  ``text_encoder_3`` (T5-XXL is 4.7B parameters): its states become zeros, as in
  diffusers with ``text_encoder_3=None``. Raises ValueError / FileNotFoundError naming a
  missing or unsupported component.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from rft.weights.clip import load_clip_text_with_projection  # pylint: disable=g-import-not-at-top
  from rft.weights.t5 import load_t5_encoder  # pylint: disable=g-import-not-at-top

  model_dir = io.resolve_model_dir(path, marker="model_index.json", expected=EXPECTED)
  has_t5 = _check_index(model_dir, load_t5)
  params, modules, configs, tokenizers = {}, [], [], []
  for key in _KEYS[:2]:
    cfg, module, p = load_clip_text_with_projection(
        model_dir, subfolder=key, allow_pickle=allow_pickle, dtype=dtype,
        param_dtype=param_dtype)
    params[key] = p
    configs.append(cfg)
    modules.append(module)
  t5 = t5_cfg = None
  if has_t5:
    t5_cfg, t5, params["text_encoder_3"] = load_t5_encoder(
        model_dir, subfolder="text_encoder_3", allow_pickle=allow_pickle, dtype=dtype,
        param_dtype=param_dtype)
  configs.append(t5_cfg)
  for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
    if name == "tokenizer_3" and not has_t5:
      tokenizers.append(None)
      continue
    tokenizers.append(AutoTokenizer.from_pretrained(os.path.join(model_dir, name)))
  jad = _joint_attention_dim(model_dir, t5_cfg.d_model if t5_cfg is not None else 4096)
  if t5_cfg is not None and jad != t5_cfg.d_model:
    raise ValueError(f"{model_dir}: transformer joint_attention_dim={jad} != "
                     f"text_encoder_3 d_model={t5_cfg.d_model}")
  encoders = SD3TextEncoders(modules[0], modules[1], t5, jad)
  return SD3Text(encoders=encoders, params=params, tokenizers=tuple(tokenizers),
                 configs=tuple(configs), path=model_dir)
