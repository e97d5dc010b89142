"""Stable Diffusion's ``UNet2DConditionModel`` (diffusers) as a Flax linen module, NHWC.

Follows ``diffusers.models.unets.unet_2d_condition`` for the SD 1.x / 2.x family::

  t ─► Timesteps (sinusoidal, flip_sin_to_cos, freq_shift) ─► TimestepEmbedding
       (linear_1, SiLU, linear_2) = emb
  x ─► conv_in ─► down_blocks ─► mid_block ─► up_blocks ─► GroupNorm, SiLU, conv_out

* ``CrossAttnDownBlock2D`` / ``DownBlock2D``: ``layers_per_block`` x (ResnetBlock2D
  [+ Transformer2DModel]), then a Downsample2D (3x3 conv, stride 2) except at the last
  level; every output is a skip.
* ``UNetMidBlock2DCrossAttn``: Resnet, then n x (Transformer2DModel, Resnet).
* ``UpBlock2D`` / ``CrossAttnUpBlock2D``: ``layers_per_block + 1`` x (concat a skip,
  Resnet [+ Transformer]), then Upsample2D (nearest x2, 3x3 conv) except at the end.
* ResnetBlock2D: ``h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv2(SiLU(GN(h)));
  out = (shortcut(x) + h) / output_scale_factor`` (1x1 conv shortcut when channels change).
* Transformer2DModel: GN (eps 1e-6), proj_in (1x1 conv, or Linear with
  ``use_linear_projection``), BasicTransformerBlocks (LN -> self-attn, LN -> cross-attn
  to the text states, LN -> GEGLU feed-forward (4x), each residual), proj_out, + input.
  Attention: ``to_q/to_k/to_v`` without bias, ``to_out.0`` with bias, scale
  ``head_dim ** -0.5``.

diffusers' naming quirk is kept: ``attention_head_dim`` holds the number of *heads* per
block (``num_attention_heads = num_attention_heads or attention_head_dim``); the head
width is ``channels // heads``. Up blocks use the reversed per-block lists.

Module names mirror the torch state-dict keys (``down_blocks.0.resnets.1.conv1`` ->
``down_blocks_0/resnets_1/conv1``), so :mod:`rft.weights.sd_unet` is a rename.

``dtype`` is the computation dtype (bfloat16 on accelerators); params stay
``param_dtype`` (float32); GroupNorm, LayerNorm statistics and softmax run in float32
and the output is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
IntOrSeq = Union[int, Tuple[int, ...]]

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that do not change the computation of the blocks we implement.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
    "dropout", "addition_embed_type_num_heads",
})
# key -> the only value(s) we implement (diffusers' defaults for SD 1.x / 2.x).
_FIXED = {
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),
    "act_fn": ("silu", "swish"),
    "mid_block_type": MID_TYPES,
}


def _tuple(v, n: int, name: str) -> Tuple[Any, ...]:
  if isinstance(v, (list, tuple)):
    if len(v) != n:
      raise ValueError(f"{name}={list(v)} must have one entry per block ({n})")
    return tuple(v)
  return (v,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of ``UNet2DConditionModel``'s config that SD 1.x / 2.x use.

  Per-block settings (``layers_per_block``, ``attention_head_dim``,
  ``transformer_layers_per_block``, ``cross_attention_dim``) are an int or one value
  per down block. ``attention_head_dim`` is the number of heads (diffusers' quirk).
  """

  in_channels: int = 4
  out_channels: int = 4
  sample_size: Optional[Any] = None  # informational (latent side), not used by the model
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: Tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: Tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: IntOrSeq = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: IntOrSeq = 1280
  transformer_layers_per_block: IntOrSeq = 1
  attention_head_dim: IntOrSeq = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      v = getattr(self, name)
      object.__setattr__(self, name, tuple(v))
      if len(v) != n:
        raise ValueError(f"{name}={list(v)} must have {n} entries (one per level)")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "attention_head_dim"):
      v = getattr(self, name)
      if isinstance(v, list):
        object.__setattr__(self, name, tuple(v))
      _tuple(getattr(self, name), n, name)
    bad = [t for t in self.down_block_types if t not in DOWN_TYPES]
    bad += [t for t in self.up_block_types if t not in UP_TYPES]
    if bad:
      raise ValueError(f"unsupported block type(s) {bad}; supported: {DOWN_TYPES + UP_TYPES}")
    for c, h in zip(self.block_out_channels, self.heads):
      if c % h:
        raise ValueError(f"block_out_channels {c} is not divisible by {h} attention heads")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups "
                         f"{self.norm_num_groups}")

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def layers(self) -> Tuple[int, ...]:
    return _tuple(self.layers_per_block, self.num_levels, "layers_per_block")

  @property
  def heads(self) -> Tuple[int, ...]:
    return _tuple(self.attention_head_dim, self.num_levels, "attention_head_dim")

  @property
  def transformer_layers(self) -> Tuple[int, ...]:
    return _tuple(self.transformer_layers_per_block, self.num_levels,
                  "transformer_layers_per_block")

  @property
  def cross_dims(self) -> Tuple[int, ...]:
    return _tuple(self.cross_attention_dim, self.num_levels, "cross_attention_dim")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """From a diffusers ``unet/config.json`` dict.

    Bookkeeping keys and dropout are ignored; a setting we do not implement (class or
    addition embeddings, dual cross-attention, scale-shift time norm, Fourier time
    embedding, other block types, ...) or an unknown key is a ValueError naming it.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kw, bad, unknown = {}, [], []
    for k, v in d.items():
      if k in _IGNORED_KEYS:
        continue
      if k in _FIXED:
        if v not in _FIXED[k]:
          bad.append(f"{k}={v!r} (supported: {list(_FIXED[k])})")
        continue
      if k == "norm_num_groups" and v is None:
        bad.append("norm_num_groups=None (supported: an int)")
        continue
      if k in fields:
        kw[k] = tuple(v) if isinstance(v, list) else v
      else:
        unknown.append(f"{k}={v!r}")
    if bad or unknown:
      msg = "unsupported UNet2DConditionModel setting(s): " + ", ".join(bad + unknown)
      raise ValueError(msg)
    return cls(**kw)

  def to_diffusers(self) -> Dict[str, Any]:
    """A ``config.json`` dict that ``diffusers.UNet2DConditionModel`` accepts."""
    d = {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
         "mid_block_type": MID_TYPES[0]}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


# ----------------------------------------------------------------------------- layers


class GroupNorm(nn.Module):
  """torch ``GroupNorm`` over NHWC, in float32 with the two-pass (centred) variance.

  Statistics are per-channel reductions over H*W (channels stay the vectorised minor
  axis, about 2-3x faster on CPU than reducing over (H*W, C/G) directly) averaged per
  group; the output is one fused ``x * a + d``.
  """

  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    g = self.num_groups
    per_group = lambda v: jnp.repeat(v.reshape(b, g, c // g).mean(-1), c // g, axis=1)
    xf = x.astype(jnp.float32).reshape(b, -1, c)
    mean = per_group(jnp.mean(xf, axis=1))  # [B, C]
    var = per_group(jnp.mean(jnp.square(xf - mean[:, None]), axis=1))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    a = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    d = bias.astype(jnp.float32) - mean * a
    return (xf * a[:, None] + d[:, None]).reshape(x.shape).astype(self.dtype)


def _conv(features, name, dtype, param_dtype, kernel=3, stride=1, padding=None):
  p = (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (time_embedding_norm="default", SiLU)."""

  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = _conv(self.out_channels, "conv1", **kw)(h)
    t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(emb))
    h = h + t[:, None, None, :].astype(h.dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = _conv(self.out_channels, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "conv_shortcut", kernel=1, **kw)(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


def _attention_core(q, k, v):
  """``softmax(q k^T / sqrt(d)) v`` for ``q [..., T, D]``, ``k, v [..., S, D]``; float32
  logits and softmax, normalisation applied after the ``p v`` product."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=jnp.float32) * scale
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("...ts,...sd->...td", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return o / l


# Logit blocks larger than this (elements) are computed in chunks on CPU.
_CPU_BLOCK = 1 << 20


def attention(q, k, v):
  """Multi-head attention ``q [B, T, H, D]``, ``k, v [B, S, H, D]`` -> ``[B, T, H, D]``
  (float32).

  On accelerators: ``jax.nn.dot_product_attention`` (float32 logits and softmax). On
  CPU, when the ``[B, H, T, S]`` logits exceed ``_CPU_BLOCK`` elements, a ``lax.map``
  over batch x head (and, for long sequences, an inner one over query chunks) so each
  logits block has at most that many elements; blocks are rematerialised in the
  backward pass: the logits stay in cache instead of streaming through memory
  (about 15x faster than the unchunked XLA attention for 16 x 8 heads x 1024 tokens).
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  if jax.default_backend() != "cpu" or b * h * t * s <= _CPU_BLOCK:
    return jax.nn.dot_product_attention(q, k, v).astype(jnp.float32)
  cq = t
  while cq * s > _CPU_BLOCK and cq % 2 == 0:
    cq //= 2
  n = t // cq
  heads_first = lambda a: a.transpose(0, 2, 1, 3).reshape(b * h, a.shape[1], d)
  core = jax.checkpoint(_attention_core)

  def one_head(args):  # q [T, D] in n chunks, k, v [S, D]
    qh, kh, vh = args
    if n == 1:
      return core(qh, kh, vh)
    return jax.lax.map(lambda qc: core(qc, kh, vh), qh.reshape(n, cq, d)).reshape(t, d)

  o = jax.lax.map(one_head, (heads_first(q), heads_first(k), heads_first(v)))
  return o.reshape(b, h, t, d).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """diffusers ``Attention`` (AttnProcessor): softmax(q k^T / sqrt(d)) v, heads split.

  Logits and softmax are always float32, so ``upcast`` (diffusers'
  ``upcast_attention``) changes nothing here beyond also keeping ``v`` in float32.
  """

  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = nn.Dense(inner, use_bias=False, name="to_q", **kw)(x)
    k = nn.Dense(inner, use_bias=False, name="to_k", **kw)(context)
    v = nn.Dense(inner, use_bias=False, name="to_v", **kw)(context)
    b = x.shape[0]
    split = lambda a: a.reshape(b, a.shape[1], self.heads, self.head_dim)
    q, k, v = split(q), split(k), split(v)
    if self.upcast:
      q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    o = attention(q, k, v).reshape(b, x.shape[1], inner).astype(self.dtype)
    return nn.Dense(x.shape[-1], name="to_out_0", **kw)(o)


class FeedForward(nn.Module):
  """GEGLU feed-forward: ``net.2(h * gelu(g))`` with ``h, g = net.0.proj(x)`` (exact GELU)."""

  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _GEGLU(dim * self.mult, name="net_0", **kw)(x)
    return nn.Dense(dim, name="net_2", **kw)(h)


class _GEGLU(nn.Module):
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hg = nn.Dense(2 * self.inner, name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
    h, g = jnp.split(hg, 2, axis=-1)
    return h * nn.gelu(g, approximate=False)


class BasicTransformerBlock(nn.Module):
  """LN -> self-attn, LN -> cross-attn, LN -> GEGLU FF; each added to its input."""

  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
    attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, name=name, **kw)
    x = x + attn("attn1")(ln("norm1")(x))
    x = x + attn("attn2")(ln("norm2")(x), context)
    return x + FeedForward(name="ff", **kw)(ln("norm3")(x))


class Transformer2DModel(nn.Module):
  """GN -> proj_in -> BasicTransformerBlocks over the H*W tokens -> proj_out, + input."""

  heads: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = nn.Dense(c, name="proj_in", **kw)(h.reshape(b, hh * ww, c))
    else:
      h = _conv(c, "proj_in", kernel=1, **kw)(h).reshape(b, hh * ww, c)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, c // self.heads, self.upcast,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, hh, ww, c)
    else:
      h = _conv(c, "proj_out", kernel=1, **kw)(h.reshape(b, hh, ww, c))
    return h + x.astype(h.dtype)


class Downsample2D(nn.Module):
  """3x3 conv, stride 2 (padding 1; padding 0 pads right/bottom by one, as diffusers)."""

  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], "conv", self.dtype, self.param_dtype, stride=2,
                 padding=self.padding)(x)


def upsample_nearest(x, size: Tuple[int, int]):
  """torch ``F.interpolate(mode="nearest", size=size)`` on NHWC: source index
  ``floor(i * in / out)``; a plain 2x repeat when ``size`` is twice the input."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  ih = jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
  iw = jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
  return x[:, ih][:, :, iw]


class Upsample2D(nn.Module):
  """Nearest upsampling (x2, or to ``size``) then a 3x3 conv."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
    x = upsample_nearest(x, size)
    return _conv(x.shape[-1], "conv", self.dtype, self.param_dtype)(x)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """diffusers ``get_timestep_embedding``: ``[sin(t f), cos(t f)]`` (or ``[cos, sin]``
  with ``flip_sin_to_cos``), ``f_i = exp(-ln(max_period) i / (dim/2 - freq_shift))``."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """``linear_2(SiLU(linear_1(t_emb)))``."""

  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.dim, name="linear_1", **kw)(x)
    return nn.Dense(self.dim, name="linear_2", **kw)(nn.silu(x))


# ----------------------------------------------------------------------------- blocks


class _Level(nn.Module):
  """A down or up block: resnets (+ transformers), then a down/upsampler."""

  config: UNetConfig
  level: int            # index into block_out_channels
  up: bool
  cross_attn: bool
  num_layers: int
  add_sampler: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, context, skips=(), upsample_size=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = cfg.block_out_channels[self.level]
    outs = []
    skips = list(skips)
    for i in range(self.num_layers):
      if self.up:
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}", **kw)(x, emb)
      if self.cross_attn:
        x = Transformer2DModel(
            cfg.heads[self.level], cfg.transformer_layers[self.level], cfg.norm_num_groups,
            cfg.use_linear_projection, cfg.upcast_attention, name=f"attentions_{i}",
            **kw)(x, context)
      outs.append(x)
    if self.add_sampler:
      if self.up:
        x = Upsample2D(name="upsamplers_0", **kw)(x, upsample_size)
      else:
        x = Downsample2D(cfg.downsample_padding, name="downsamplers_0", **kw)(x)
        outs.append(x)
    return x, outs


class UNetMidBlock2DCrossAttn(nn.Module):
  """Resnet, then ``n`` x (Transformer2DModel, Resnet); resnets scaled by
  ``1 / mid_block_scale_factor``."""

  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, context):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = cfg.block_out_channels[-1]
    res = lambda i: ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps,
                                  cfg.mid_block_scale_factor, name=f"resnets_{i}", **kw)
    x = res(0)(x, emb)
    x = Transformer2DModel(cfg.heads[-1], cfg.transformer_layers[-1], cfg.norm_num_groups,
                           cfg.use_linear_projection, cfg.upcast_attention,
                           name="attentions_0", **kw)(x, context)
    return res(1)(x, emb)


class UNet2DCondition(nn.Module):
  """diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x): ``(sample [B,H,W,C] NHWC,
  timesteps (scalar or [B], int or float), encoder_hidden_states [B,L,D]) ->
  [B,H,W,out_channels]`` float32."""

  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = sample.shape[0]
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                               cfg.freq_shift)
    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb)
    context = encoder_hidden_states.astype(self.dtype)

    x = _conv(cfg.block_out_channels[0], "conv_in", kernel=cfg.conv_in_kernel, **kw)(
        sample.astype(self.dtype))
    skips = [x]
    n = cfg.num_levels
    for i, kind in enumerate(cfg.down_block_types):
      x, outs = _Level(cfg, i, False, kind == "CrossAttnDownBlock2D", cfg.layers[i],
                       i < n - 1, name=f"down_blocks_{i}", **kw)(x, emb, context)
      skips += outs

    x = UNetMidBlock2DCrossAttn(cfg, name="mid_block", **kw)(x, emb, context)

    layers = cfg.layers[::-1]
    for i, kind in enumerate(cfg.up_block_types):
      m = layers[i] + 1
      mine, skips = skips[-m:], skips[:-m]
      size = skips[-1].shape[1:3] if i < n - 1 else None
      level = n - 1 - i
      x, _ = _Level(cfg, level, True, kind == "CrossAttnUpBlock2D", m, i < n - 1,
                    name=f"up_blocks_{i}", **kw)(x, emb, context, mine, size)

    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
    x = _conv(cfg.out_channels, "conv_out", kernel=cfg.conv_out_kernel, **kw)(x)
    return x.astype(jnp.float32)


def init_params(config: UNetConfig, rng, *, sample_hw: Sequence[int] = (8, 8),
                text_len: int = 4):
  """Random params (flax init) for ``config``: ``{"params": ...}``'s inner tree."""
  cfg = config
  x = jnp.zeros((1, *sample_hw, cfg.in_channels), jnp.float32)
  ctx = jnp.zeros((1, text_len, cfg.cross_dims[0]), jnp.float32)
  return UNet2DCondition(cfg).init(rng, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
