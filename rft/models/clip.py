"""CLIP text and vision towers in Flax: the Hugging Face ``transformers`` layout and OpenCLIP's.

Both formats are the same pre-LN ViT / causal text transformer (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision")::

  block(x) = x + Attn(LN1(x));  x + MLP(LN2(x)),   MLP = fc2(act(fc1(.)))
  act      = quick_gelu (x * sigmoid(1.702 x), OpenAI weights) or exact (erf) gelu
  Attn     = softmax(q k^T / sqrt(head_dim) [+ causal mask]) v, heads concatenated

* Text (``transformers.CLIPTextModel``): token + learned position embeddings, causal
  self-attention, ``final_layer_norm``; pooled = the EOS token's state. As transformers
  does: with ``eos_token_id == 2`` (configs from before transformers PR #24773) the EOS
  position is ``argmax(input_ids)`` (EOT has the largest id), else the first position
  whose id is ``eos_token_id``. SD 1.x uses OpenAI ViT-L/14's text tower (quick_gelu),
  SD 2.x OpenCLIP-H's (gelu, 23 layers); diffusers feeds ``last_hidden_state`` to the UNet.
* Vision (``transformers.CLIPVisionModel``): patch conv (no bias), class token, learned
  position embedding, ``pre_layrnorm``, encoder, ``post_layernorm`` on the class token.
* :class:`CLIPModel` / :class:`CLIPVisionModelWithProjection` /
  :class:`CLIPTextModelWithProjection` add bias-free ``text_projection`` /
  ``visual_projection`` (and CLIPModel ``logit_scale``, stored as its log).
* :class:`OpenCLIPModel` (in :mod:`rft.models.open_clip`, which builds on this module) is
  ``open_clip.CLIP`` (ViT towers): fused ``in_proj`` q/k/v,
  ``proj`` / ``text_projection`` matrices (``x @ proj``), optional LayerScale, text
  pooled at ``argmax(ids)``; built-in configs for ViT-H-14 (HPSv2) and ViT-L-14.

Parameter names mirror the torch modules (``layers.N`` -> ``layers_N``, Linear
``weight`` -> ``kernel`` transposed, LayerNorm ``weight`` -> ``scale``, Embedding
``weight`` -> ``embedding``), so ``rft.weights.clip`` converts by renaming.

Layout and numerics: images are NHWC (already resized and normalised); params float32,
``dtype`` is the compute dtype; LayerNorm, attention logits and softmax are float32.
Checked against transformers / open_clip to <= 1e-4 in ``tests/test_clip.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "CLIPConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",
    "CLIPModel",
    "CLIPVisionModelWithProjection",
    "prompt_embeds",
]

Dtype = Any
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_ACTS = ("quick_gelu", "gelu")


# ----------------------------------------------------------------------------- configs


def _get(d: Mapping[str, Any], key: str, default: Any, kind=int) -> Any:
  v = d.get(key, default)
  if v is None:
    v = default
  try:
    return kind(v)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config key {key!r}: cannot read {v!r} as {kind.__name__}") from e


def _check_act(key: str, act: str) -> str:
  if act not in _ACTS:
    raise ValueError(f"unsupported {key}={act!r}: supported values are {list(_ACTS)}")
  return act


def _check_heads(where: str, width: int, heads: int):
  if heads <= 0 or width % heads:
    raise ValueError(f"{where}: hidden size {width} is not divisible by "
                     f"num_attention_heads={heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """``transformers.CLIPTextConfig`` (defaults are transformers')."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 49407

  def __post_init__(self):
    _check_act("hidden_act", self.hidden_act)
    _check_heads("CLIPTextConfig", self.hidden_size, self.num_attention_heads)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a ``CLIPTextConfig`` dict, or a full ``CLIPConfig`` dict (its ``text_config``)."""
    if "text_config" in d:
      sub = d["text_config"] or d.get("text_config_dict") or {}
      d = dict(sub, projection_dim=d.get("projection_dim", 512))
    f = cls()
    return cls(
        vocab_size=_get(d, "vocab_size", f.vocab_size),
        hidden_size=_get(d, "hidden_size", f.hidden_size),
        intermediate_size=_get(d, "intermediate_size", f.intermediate_size),
        num_hidden_layers=_get(d, "num_hidden_layers", f.num_hidden_layers),
        num_attention_heads=_get(d, "num_attention_heads", f.num_attention_heads),
        max_position_embeddings=_get(d, "max_position_embeddings",
                                     f.max_position_embeddings),
        hidden_act=_check_act("hidden_act", d.get("hidden_act", f.hidden_act)),
        layer_norm_eps=_get(d, "layer_norm_eps", f.layer_norm_eps, float),
        projection_dim=_get(d, "projection_dim", f.projection_dim),
        eos_token_id=_get(d, "eos_token_id", f.eos_token_id),
    )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """``transformers.CLIPVisionConfig`` (defaults are transformers')."""

  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    _check_act("hidden_act", self.hidden_act)
    _check_heads("CLIPVisionConfig", self.hidden_size, self.num_attention_heads)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size={self.image_size} is not a multiple "
                       f"of patch_size={self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a ``CLIPVisionConfig`` dict, or a full ``CLIPConfig`` dict (its
    ``vision_config``, with the top-level ``projection_dim``)."""
    if "vision_config" in d:
      sub = d["vision_config"] or d.get("vision_config_dict") or {}
      d = dict(sub, projection_dim=d.get("projection_dim", 512))
    f = cls()
    return cls(
        image_size=_get(d, "image_size", f.image_size),
        patch_size=_get(d, "patch_size", f.patch_size),
        num_channels=_get(d, "num_channels", f.num_channels),
        hidden_size=_get(d, "hidden_size", f.hidden_size),
        intermediate_size=_get(d, "intermediate_size", f.intermediate_size),
        num_hidden_layers=_get(d, "num_hidden_layers", f.num_hidden_layers),
        num_attention_heads=_get(d, "num_attention_heads", f.num_attention_heads),
        hidden_act=_check_act("hidden_act", d.get("hidden_act", f.hidden_act)),
        layer_norm_eps=_get(d, "layer_norm_eps", f.layer_norm_eps, float),
        projection_dim=_get(d, "projection_dim", f.projection_dim),
    )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """``transformers.CLIPConfig``: both towers and the shared ``projection_dim``."""

  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    if "text_config" not in d and "vision_config" not in d:
      raise ValueError("not a CLIPModel config: no 'text_config' / 'vision_config' "
                       f"(model_type={d.get('model_type')!r})")
    return cls(text=CLIPTextConfig.from_hf(d), vision=CLIPVisionConfig.from_hf(d),
               projection_dim=_get(d, "projection_dim", 512),
               logit_scale_init_value=_get(d, "logit_scale_init_value", 2.6592, float))


# ----------------------------------------------------------------------------- layers


def _act(name: str, x):
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  raise ValueError(f"unsupported activation {name!r}")


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02), name=name)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (params ``scale``, ``bias``), cast to ``dtype``."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def _attend(q, k, v, mask):
  """q, k, v ``[B, L, H, Dh]``; mask bool broadcastable to ``[B, H, Lq, Lk]`` or None."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def _heads(x, n):
  return x.reshape(x.shape[:-1] + (n, x.shape[-1] // n))


class CLIPAttention(nn.Module):
  """transformers ``CLIPAttention``: separate ``q_proj`` / ``k_proj`` / ``v_proj``."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    d = x.shape[-1]
    q = _heads(_dense(d, self.dtype, "q_proj")(x), self.num_heads)
    k = _heads(_dense(d, self.dtype, "k_proj")(x), self.num_heads)
    v = _heads(_dense(d, self.dtype, "v_proj")(x), self.num_heads)
    out = _attend(q, k, v, mask)
    return _dense(d, self.dtype, "out_proj")(out.reshape(x.shape[:-1] + (d,)))


class CLIPMLP(nn.Module):
  """Linear -> activation -> Linear back to the input width; ``names`` are the two
  layers' param names (transformers: fc1 / fc2, open_clip: c_fc / c_proj)."""

  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  names: Tuple[str, str] = ("fc1", "fc2")

  @nn.compact
  def __call__(self, x):
    h = _act(self.hidden_act, _dense(self.intermediate_size, self.dtype, self.names[0])(x))
    return _dense(x.shape[-1], self.dtype, self.names[1])(h)


class CLIPEncoderLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    h = LayerNorm(self.eps, self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(h, mask)
    h = LayerNorm(self.eps, self.dtype, name="layer_norm2")(x)
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """``layers_0 .. layers_{n-1}``; returns every hidden state, the input first."""

  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None) -> Tuple[jax.Array, ...]:
    states = [x]
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act, self.eps,
                           self.dtype, name=f"layers_{i}")(x, mask)
      states.append(x)
    return tuple(states)


def _encoder(c, dtype, name=None) -> CLIPEncoder:
  return CLIPEncoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                     c.hidden_act, c.layer_norm_eps, dtype, name=name)


def _causal_mask(length: int, attention_mask=None):
  """bool ``[1 or B, 1, L, L]``: causal, and (optionally) keys where attention_mask is 1."""
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
  return mask


def _take(x, idx):
  """``x[b, idx[b]]`` for x ``[B, L, D]``."""
  return jnp.take_along_axis(x, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]


# ----------------------------------------------------------------------------- HF towers


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    length = input_ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} > max_position_embeddings="
                       f"{c.max_position_embeddings}")
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                   embedding_init=init, name="token_embedding")(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                   param_dtype=jnp.float32, embedding_init=init,
                   name="position_embedding")(jnp.arange(length))
    return tok + pos[None]


class CLIPTextModel(nn.Module):
  """``transformers.CLIPTextModel`` (SD 1.x / 2.x text encoder).

  ``__call__(input_ids [B, L] int, attention_mask=None)`` returns a dict:

  * ``last_hidden_state [B, L, D]`` -- after ``final_layer_norm`` (what diffusers feeds
    the UNet);
  * ``pooled [B, D]`` -- ``last_hidden_state`` at the EOS token (see the module doc);
  * ``hidden_states`` -- ``num_hidden_layers + 1`` states ``[B, L, D]``, the embeddings
    first, each layer's output after, *before* ``final_layer_norm`` (as transformers'
    ``output_hidden_states``; see :func:`prompt_embeds` for ``clip_skip``).

  The mask is causal; ``attention_mask`` (1 = real token) additionally masks padded keys
  as transformers does (SD pipelines pass none).
  """

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embeddings = CLIPTextEmbeddings(c, self.dtype)
    self.encoder = _encoder(c, self.dtype)
    self.final_layer_norm = LayerNorm(c.layer_norm_eps, self.dtype)

  def __call__(self, input_ids, attention_mask=None) -> Dict[str, Any]:
    input_ids = jnp.asarray(input_ids)
    x = self.embeddings(input_ids)
    states = self.encoder(x, _causal_mask(input_ids.shape[-1], attention_mask))
    last = self.final_layer_norm(states[-1])
    if self.config.eos_token_id == 2:  # legacy configs: EOT has the largest id
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    return dict(last_hidden_state=last, pooled=_take(last, eos), hidden_states=states)

  def layer_norm(self, x):
    """``final_layer_norm`` alone (for ``clip_skip``: LN of an earlier hidden state)."""
    return self.final_layer_norm(x)


def prompt_embeds(model: CLIPTextModel, params, input_ids, clip_skip: Optional[int] = None):
  """diffusers' ``encode_prompt`` text states: ``last_hidden_state``, or with
  ``clip_skip = k >= 1`` ``final_layer_norm(hidden_states[-(k + 1)])``."""
  out = model.apply({"params": params}, input_ids)
  if not clip_skip:
    return out["last_hidden_state"]
  states = out["hidden_states"]
  if not 1 <= clip_skip < len(states):
    raise ValueError(f"clip_skip={clip_skip} must be in [1, {len(states) - 1}]")
  return model.apply({"params": params}, states[-(clip_skip + 1)], method="layer_norm")


class CLIPTextModelWithProjection(nn.Module):
  """``transformers.CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``, SD3's
  ``text_encoder`` / ``text_encoder_2``): ``text_model`` + bias-free ``text_projection``
  to ``config.projection_dim``.

  ``__call__(input_ids, attention_mask=None)`` returns :class:`CLIPTextModel`'s dict plus
  ``text_embeds [B, projection_dim]`` = ``text_projection(pooled)`` (not normalised).
  """

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.text_model = CLIPTextModel(self.config, self.dtype)
    self.text_projection = _dense(self.config.projection_dim, self.dtype, "text_projection",
                                  use_bias=False)

  def __call__(self, input_ids, attention_mask=None) -> Dict[str, Any]:
    out = dict(self.text_model(input_ids, attention_mask))
    out["text_embeds"] = self.text_projection(out["pooled"])
    return out

  def layer_norm(self, x):
    """``text_model.final_layer_norm`` alone (see :func:`prompt_embeds`)."""
    return self.text_model.layer_norm(x)


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b, h, w, ch = pixel_values.shape
    if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"pixel_values must be NHWC [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}], got {tuple(pixel_values.shape)}")
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32,
                name="patch_embedding")(pixel_values.astype(self.dtype))
    x = x.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x],
                        axis=1)
    pos = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                   embedding_init=nn.initializers.normal(0.02),
                   name="position_embedding")(jnp.arange(c.num_positions))
    return x + pos[None]


class CLIPVisionModel(nn.Module):
  """``transformers.CLIPVisionModel``: ``pixel_values [B, H, W, C]`` (NHWC, normalised)
  -> ``dict(last_hidden_state [B, 1 + patches, D], pooled [B, D])``, pooled =
  ``post_layernorm`` of the class token."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> Dict[str, Any]:
    c = self.config
    x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(jnp.asarray(pixel_values))
    x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_layrnorm")(x)
    last = _encoder(c, self.dtype, "encoder")(x)[-1]
    pooled = LayerNorm(c.layer_norm_eps, self.dtype, name="post_layernorm")(last[:, 0])
    return dict(last_hidden_state=last, pooled=pooled)


class CLIPVisionModelWithProjection(nn.Module):
  """``transformers.CLIPVisionModelWithProjection``: ``vision_model`` + bias-free
  ``visual_projection`` to ``config.projection_dim``."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.vision_model = CLIPVisionModel(self.config, self.dtype)
    self.visual_projection = _dense(self.config.projection_dim, self.dtype,
                                    "visual_projection", use_bias=False)

  def __call__(self, pixel_values) -> Dict[str, Any]:
    out = self.vision_model(pixel_values)
    return dict(image_embeds=self.visual_projection(out["pooled"]),
                last_hidden_state=out["last_hidden_state"])

  def image_features(self, pixel_values):
    """``[B, projection_dim]``, projected, not normalised (``image_embeds``)."""
    return self.visual_projection(self.vision_model(pixel_values)["pooled"])


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
  """``transformers.CLIPModel``: ``text_model``, ``vision_model``, bias-free
  ``text_projection`` / ``visual_projection`` and ``logit_scale`` (the log of the
  temperature, as stored in torch: ``params["logit_scale"]``).

  ``__call__(input_ids, pixel_values)`` gives ``text_embeds`` / ``image_embeds``
  (normalised) and ``logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T``.
  """

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.text_model = CLIPTextModel(c.text, self.dtype)
    self.vision_model = CLIPVisionModel(c.vision, self.dtype)
    self.text_projection = _dense(c.projection_dim, self.dtype, "text_projection", False)
    self.visual_projection = _dense(c.projection_dim, self.dtype, "visual_projection", False)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), jnp.float32)

  def text_features(self, input_ids, attention_mask=None):
    """``[B, projection_dim]``: projected pooled text state, not normalised."""
    return self.text_projection(self.text_model(input_ids, attention_mask)["pooled"])

  def image_features(self, pixel_values):
    """``[B, projection_dim]``: projected pooled image state, not normalised."""
    return self.visual_projection(self.vision_model(pixel_values)["pooled"])

  def __call__(self, input_ids, pixel_values) -> Dict[str, Any]:
    t = _normalize(self.text_features(input_ids))
    i = _normalize(self.image_features(pixel_values))
    logits = jnp.exp(self.logit_scale) * i @ t.T
    return dict(text_embeds=t, image_embeds=i, logits_per_image=logits,
                logits_per_text=logits.T)
