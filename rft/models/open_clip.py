"""OpenCLIP's ``open_clip.CLIP`` (ViT towers) in Flax: the format of HPSv2's checkpoints.

The same pre-LN transformer as :mod:`rft.models.clip` (whose layers it reuses), with
open_clip's layout: fused ``in_proj`` q/k/v, ``proj`` / ``text_projection`` matrices
(``x @ proj``), optional LayerScale, text pooled at ``argmax(ids)`` (EOT has the largest
id); built-in configs for ViT-H-14 (HPSv2) and ViT-L-14. Loaded by
``rft.weights.clip.load_open_clip``; checked against open_clip in ``tests/test_clip.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from rft.models.clip import (CLIPMLP, Dtype, LayerNorm, _attend, _causal_mask, _check_heads,
                             _dense, _heads, _normalize, _take)


_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio",
                "ls_init_value", "no_ln_pre", "pool_type", "final_ln_after_pool",
                "norm_kwargs"}
_VISION_IGNORED = {"patch_dropout", "output_tokens", "timm_model_pretrained", "timm_pool",
                   "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
              "ls_init_value", "pool_type", "eos_id", "no_causal_mask", "proj_bias",
              "norm_kwargs"}
_TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "output_tokens",
                 "pad_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
# Options that change the architecture: accepted only at their open_clip default.
_DEFAULTS = {"attentional_pool": False, "pos_embed_type": "learnable", "block_type": None,
             "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
             "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
             "timm_model_name": None, "hf_model_name": None, "act_kwargs": None,
             "embed_cls": False, "proj_type": "linear", "attn_pooler_queries": 256,
             "attn_pooler_heads": 8}


def _square(key: str, v) -> int:
  if isinstance(v, (tuple, list)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f"unsupported {key}={v!r}: only square sizes are supported")
    v = v[0]
  return int(v)


def _eps(where: str, norm_kwargs) -> float:
  norm_kwargs = dict(norm_kwargs or {})
  eps = float(norm_kwargs.pop("eps", 1e-5))
  if norm_kwargs:
    raise ValueError(f"unsupported {where}.norm_kwargs={norm_kwargs!r}: only 'eps'")
  return eps


def _check_keys(where: str, d: Mapping[str, Any], known, ignored):
  for k, v in d.items():
    if k in known or k in ignored:
      continue
    if k in _DEFAULTS:
      if v != _DEFAULTS[k]:
        raise ValueError(f"unsupported {where}.{k}={v!r} (only {_DEFAULTS[k]!r} is "
                         "supported)")
      continue
    raise ValueError(f"unsupported {where} key {k!r} (value {v!r})")


@dataclasses.dataclass(frozen=True)
class OpenCLIPVisionConfig:
  """open_clip ``CLIPVisionCfg`` (ViT only); heads = ``width // head_width``."""

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  ls_init_value: Optional[float] = None
  no_ln_pre: bool = False
  pool_type: str = "tok"
  final_ln_after_pool: bool = False
  eps: float = 1e-5

  def __post_init__(self):
    _check_heads("OpenCLIPVisionConfig", self.width, self.heads)
    if self.pool_type not in ("tok", "avg"):
      raise ValueError(f"unsupported vision_cfg.pool_type={self.pool_type!r}: "
                       "supported values are ['tok', 'avg']")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision_cfg: image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_open_clip(cls, d: Mapping[str, Any]) -> "OpenCLIPVisionConfig":
    _check_keys("vision_cfg", d, _VISION_KEYS, _VISION_IGNORED)
    layers = d.get("layers", 12)
    if isinstance(layers, (tuple, list)):
      raise ValueError(f"unsupported vision_cfg.layers={layers!r}: ModifiedResNet towers are "
                       "not supported (ViT only)")
    width = int(d.get("width", 768))
    head_width = int(d.get("head_width", 64))
    if width % head_width:
      raise ValueError(f"vision_cfg: width={width} is not a multiple of "
                       f"head_width={head_width}")
    return cls(image_size=_square("vision_cfg.image_size", d.get("image_size", 224)),
               patch_size=_square("vision_cfg.patch_size", d.get("patch_size", 16)),
               width=width, layers=int(layers), heads=width // head_width,
               mlp_ratio=float(d.get("mlp_ratio", 4.0)),
               ls_init_value=d.get("ls_init_value"),
               no_ln_pre=bool(d.get("no_ln_pre", False)),
               pool_type=d.get("pool_type", "tok"),
               final_ln_after_pool=bool(d.get("final_ln_after_pool", False)),
               eps=_eps("vision_cfg", d.get("norm_kwargs")))


@dataclasses.dataclass(frozen=True)
class OpenCLIPTextConfig:
  """open_clip ``CLIPTextCfg`` (the built-in text transformer, as used by ``CLIP``)."""

  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  ls_init_value: Optional[float] = None
  pool_type: str = "argmax"
  eos_id: int = 2
  causal: bool = True
  proj_bias: bool = False
  eps: float = 1e-5

  def __post_init__(self):
    _check_heads("OpenCLIPTextConfig", self.width, self.heads)
    if self.pool_type not in ("argmax", "eos", "first", "last"):
      raise ValueError(f"unsupported text_cfg.pool_type={self.pool_type!r}: supported "
                       "values are ['argmax', 'eos', 'first', 'last']")

  @classmethod
  def from_open_clip(cls, d: Mapping[str, Any]) -> "OpenCLIPTextConfig":
    _check_keys("text_cfg", d, _TEXT_KEYS, _TEXT_IGNORED)
    return cls(context_length=int(d.get("context_length", 77)),
               vocab_size=int(d.get("vocab_size", 49408)),
               width=int(d.get("width", 512)), heads=int(d.get("heads", 8)),
               layers=int(d.get("layers", 12)), mlp_ratio=float(d.get("mlp_ratio", 4.0)),
               ls_init_value=d.get("ls_init_value"),
               pool_type=d.get("pool_type", "argmax"), eos_id=int(d.get("eos_id", 2)),
               causal=not d.get("no_causal_mask", False),
               proj_bias=bool(d.get("proj_bias", False)),
               eps=_eps("text_cfg", d.get("norm_kwargs")))


@dataclasses.dataclass(frozen=True)
class OpenCLIPConfig:
  """open_clip's ``model_config`` JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``,
  ``quick_gelu``) for ``open_clip.CLIP`` with ViT towers."""

  embed_dim: int = 512
  vision: OpenCLIPVisionConfig = OpenCLIPVisionConfig()
  text: OpenCLIPTextConfig = OpenCLIPTextConfig()
  quick_gelu: bool = False

  @property
  def act(self) -> str:
    return "quick_gelu" if self.quick_gelu else "gelu"

  @classmethod
  def from_open_clip(cls, d: Mapping[str, Any]) -> "OpenCLIPConfig":
    """From a model_config dict (or an ``open_clip_config.json`` with ``model_cfg``)."""
    if "model_cfg" in d:
      d = d["model_cfg"]
    for k, v in d.items():
      if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
               "cast_dtype", "nonscalar_logit_scale"):
        continue
      if k in ("custom_text", "init_logit_bias") and not v:
        continue
      raise ValueError(f"unsupported open_clip model config key {k!r} (value {v!r}); "
                       "only open_clip.CLIP with ViT towers is supported")
    if "embed_dim" not in d:
      raise ValueError("open_clip model config: missing 'embed_dim'")
    return cls(embed_dim=int(d["embed_dim"]),
               vision=OpenCLIPVisionConfig.from_open_clip(d.get("vision_cfg") or {}),
               text=OpenCLIPTextConfig.from_open_clip(d.get("text_cfg") or {}),
               quick_gelu=bool(d.get("quick_gelu", False)))

  @classmethod
  def named(cls, name: str) -> "OpenCLIPConfig":
    """A built-in config: one of :data:`OPEN_CLIP_CONFIGS`."""
    if name not in OPEN_CLIP_CONFIGS:
      raise ValueError(f"unknown open_clip model {name!r}; built-in: "
                       f"{sorted(OPEN_CLIP_CONFIGS)} (or pass an OpenCLIPConfig / "
                       "an open_clip model_config dict)")
    return OPEN_CLIP_CONFIGS[name]


# open_clip/model_configs/*.json (open_clip_torch 3.3.0).
OPEN_CLIP_CONFIGS: Dict[str, OpenCLIPConfig] = {
    "ViT-H-14": OpenCLIPConfig.from_open_clip(dict(
        embed_dim=1024,
        vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
        text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16,
                      layers=24))),
    "ViT-L-14": OpenCLIPConfig.from_open_clip(dict(
        embed_dim=768,
        vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
        text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12,
                      layers=12))),
}
OPEN_CLIP_CONFIGS["ViT-L-14-quickgelu"] = dataclasses.replace(
    OPEN_CLIP_CONFIGS["ViT-L-14"], quick_gelu=True)


class _MHA(nn.Module):
  """``torch.nn.MultiheadAttention`` (self-attention): fused ``in_proj`` (q, k, v rows)."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    d = x.shape[-1]
    q, k, v = jnp.split(_dense(3 * d, self.dtype, "in_proj")(x), 3, axis=-1)
    out = _attend(_heads(q, self.num_heads), _heads(k, self.num_heads),
                  _heads(v, self.num_heads), mask)
    return _dense(d, self.dtype, "out_proj")(out.reshape(x.shape[:-1] + (d,)))


class _LayerScale(nn.Module):
  init_value: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    g = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                   jnp.float32)
    return x * g.astype(self.dtype)


class _ResidualAttentionBlock(nn.Module):
  """open_clip ``ResidualAttentionBlock``: ln_1, attn, [ls_1], ln_2, mlp.c_fc/c_proj, [ls_2]."""

  heads: int
  mlp_ratio: float
  act: str
  eps: float
  ls_init_value: Optional[float]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    d = x.shape[-1]
    ls = ((lambda n, y: _LayerScale(self.ls_init_value, self.dtype, name=n)(y))
          if self.ls_init_value is not None else (lambda n, y: y))
    h = _MHA(self.heads, self.dtype, name="attn")(
        LayerNorm(self.eps, self.dtype, name="ln_1")(x), mask)
    x = x + ls("ls_1", h)
    h = LayerNorm(self.eps, self.dtype, name="ln_2")(x)
    mlp = CLIPMLP(int(d * self.mlp_ratio), self.act, self.dtype, ("c_fc", "c_proj"), name="mlp")
    return x + ls("ls_2", mlp(h))


class _Transformer(nn.Module):
  """open_clip ``Transformer``: ``resblocks_0 .. resblocks_{n-1}``."""

  layers: int
  heads: int
  mlp_ratio: float
  act: str
  eps: float
  ls_init_value: Optional[float]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.layers):
      x = _ResidualAttentionBlock(self.heads, self.mlp_ratio, self.act, self.eps,
                                  self.ls_init_value, self.dtype, name=f"resblocks_{i}")(x, mask)
    return x


class _OpenCLIPVisual(nn.Module):
  """open_clip ``VisionTransformer``: ``conv1`` (no bias), ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer``, ``ln_post``, ``proj``."""

  config: OpenCLIPVisionConfig
  embed_dim: int
  act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b, h, w, ch = pixel_values.shape
    if (h, w, ch) != (c.image_size, c.image_size, 3):
      raise ValueError(f"pixel_values must be NHWC [B, {c.image_size}, {c.image_size}, 3], "
                       f"got {tuple(pixel_values.shape)}")
    p = c.patch_size
    x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32,
                name="conv1")(pixel_values.astype(self.dtype))
    x = x.reshape(b, -1, c.width)
    init = nn.initializers.normal(c.width ** -0.5)
    cls = self.param("class_embedding", init, (c.width,), jnp.float32)
    pos = self.param("positional_embedding", init, (c.num_positions, c.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], 1)
    x = x + pos.astype(self.dtype)[None]
    if not c.no_ln_pre:
      x = LayerNorm(c.eps, self.dtype, name="ln_pre")(x)
    x = _Transformer(c.layers, c.heads, c.mlp_ratio, self.act, c.eps, c.ls_init_value,
                     self.dtype, name="transformer")(x)
    ln_post = LayerNorm(c.eps, self.dtype, name="ln_post")
    if not c.final_ln_after_pool:
      x = ln_post(x)
    pooled = x[:, 0] if c.pool_type == "tok" else jnp.mean(x[:, 1:], axis=1)
    if c.final_ln_after_pool:
      pooled = ln_post(pooled)
    proj = self.param("proj", init, (c.width, self.embed_dim), jnp.float32)
    return pooled @ proj.astype(self.dtype)


class OpenCLIPModel(nn.Module):
  """``open_clip.CLIP`` with ViT towers; params named as its state dict.

  ``image_features(pixel_values [B, H, W, 3])`` = ``encode_image(normalize=False)``;
  ``text_features(text [B, L<=context_length])`` = ``encode_text(normalize=False)``:
  token + positional embedding, causal transformer, ``ln_final``, pooled at
  ``argmax(text)`` (EOT has the largest id; or ``pool_type``), ``@ text_projection``.
  ``params["logit_scale"]`` is the log of the temperature. ``__call__(pixel_values,
  text)`` returns both (normalised) and ``logits_per_image``.
  """

  config: OpenCLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    t = c.text
    self.visual = _OpenCLIPVisual(c.vision, c.embed_dim, c.act, self.dtype)
    self.token_embedding = nn.Embed(t.vocab_size, t.width, dtype=self.dtype,
                                    param_dtype=jnp.float32,
                                    embedding_init=nn.initializers.normal(0.02))
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(0.01), (t.context_length, t.width),
        jnp.float32)
    self.transformer = _Transformer(t.layers, t.heads, t.mlp_ratio, c.act, t.eps,
                                    t.ls_init_value, self.dtype)
    self.ln_final = LayerNorm(t.eps, self.dtype)
    if t.proj_bias:
      self.text_projection = _dense(c.embed_dim, self.dtype, "text_projection")
    else:
      self.text_projection = self.param(
          "text_projection", nn.initializers.normal(t.width ** -0.5), (t.width, c.embed_dim),
          jnp.float32)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  (), jnp.float32)

  def image_features(self, pixel_values):
    """``[B, embed_dim]``: ``encode_image(normalize=False)``."""
    return self.visual(jnp.asarray(pixel_values))

  def text_features(self, text):
    """``[B, embed_dim]``: ``encode_text(normalize=False)``."""
    t = self.config.text
    text = jnp.asarray(text)
    length = text.shape[-1]
    if length > t.context_length:
      raise ValueError(f"text length {length} > context_length={t.context_length}")
    x = self.token_embedding(text) + self.positional_embedding[:length].astype(self.dtype)
    x = self.transformer(x, _causal_mask(length) if t.causal else None)
    x = self.ln_final(x)
    if t.pool_type == "argmax":
      pooled = _take(x, jnp.argmax(text, axis=-1))
    elif t.pool_type == "eos":
      pooled = _take(x, jnp.argmax((text == t.eos_id).astype(jnp.int32), axis=-1))
    elif t.pool_type == "first":
      pooled = x[:, 0]
    else:
      pooled = x[:, -1]
    if t.proj_bias:
      return self.text_projection(pooled)
    return pooled @ self.text_projection.astype(self.dtype)

  def __call__(self, pixel_values, text) -> Dict[str, Any]:
    i = _normalize(self.image_features(pixel_values))
    t = _normalize(self.text_features(text))
    logits = jnp.exp(self.logit_scale) * i @ t.T
    return dict(image_features=i, text_features=t, logits_per_image=logits,
                logits_per_text=logits.T)
