"""Stable Diffusion 3 / 3.5 MMDiT (``SD3Transformer2DModel``) as a Flax linen module, NHWC.

The multimodal diffusion transformer of Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (Stable Diffusion 3,
arXiv:2403.03206), following diffusers ``SD3Transformer2DModel``
(``models/transformers/transformer_sd3.py``; ``JointTransformerBlock`` in
``attention.py``; ``JointAttnProcessor2_0``; ``PatchEmbed`` /
``CombinedTimestepTextProjEmbeddings`` in ``embeddings.py``; ``AdaLayerNormZero`` /
``AdaLayerNormContinuous`` / ``SD35AdaLayerNormZeroX`` in ``normalization.py``)::

  latent [B,H,W,C] ─► pos_embed: p×p stride-p conv ─► x [B, N=(H/p)(W/p), D]
                       + 2D sin-cos position table (centre crop of a max×max grid)
  t [B], pooled [B,P] ─► time_text_embed:
        c = MLP(sincos_256(t)) + MLP_silu(pooled)                                 [B, D]
  text [B,L,J] ─► context_embedder (Dense J -> D) ─► y [B, L, D]

  num_layers × JointTransformerBlock(x, y, c)  (two streams, one joint attention):
        (sx1, ax1, gx1, sx2, ax2, gx2) = Dense(silu(c))          adaLN-Zero, image stream
        (sy1, ay1, gy1, sy2, ay2, gy2) = Dense(silu(c))          adaLN-Zero, text stream
        x̂ = LN(x)(1 + ax1) + sx1            ŷ = LN(y)(1 + ay1) + sy1
        q, k, v = [Wq x̂ ; Wq' ŷ], [Wk x̂ ; Wk' ŷ], [Wv x̂ ; Wv' ŷ]   (tokens concatenated)
        (q, k per head RMS-normed when qk_norm = "rms_norm", SD3.5)
        o = softmax(q kᵀ / √d) v,  split back into image / text tokens
        x += gx1 · Wo o_x                      y += gy1 · Wo' o_y
        [dual attention (SD3.5-Medium, SD35AdaLayerNormZeroX, 9 chunks instead of 6):
         x += gx3 · attn2(LN(x_in)(1 + ax3) + sx3), image tokens only, its own weights]
        x += gx2 · FF(LN(x)(1 + ax2) + sx2)    y += gy2 · FF'(LN(y)(1 + ay2) + sy2)
     FF = Dense(4D) ─ GELU(tanh) ─ Dense(D). The last block is ``context_pre_only``: the
     text stream is only read (ŷ = AdaLayerNormContinuous(y, c); no text output
     projection, no text FF) and y is dropped.

  norm_out: LN(x)(1 + scale) + shift, (scale, shift) = Dense(silu(c))
  proj_out: Dense D -> p·p·out ─► unpatchify ─► [B,H,W,out]

LayerNorms here have no affine parameters and eps 1e-6. The sin-cos table follows
diffusers ``get_2d_sincos_pos_embed``: grid coordinates ``i / (grid / base_size)`` with
``base_size = sample_size // patch_size``; the first half of the channels encodes the
column, the second half the row, each as ``[sin(pos ω), cos(pos ω)]`` with
``ω_k = 10000^(-k / (D/4))``. With ``pos_embed_max_size`` (every published SD3 / 3.5
model) the table is the ``max×max`` grid, centre-cropped to the latent's ``(H/p, W/p)``
patches; without it the table is computed for ``(H/p, W/p)`` directly. The table is a
constant computed with numpy at trace time (it is a buffer, not a parameter, in
diffusers; the loader checks the checkpoint's copy against it).

Parameter names mirror the diffusers module names with ``.N.`` written ``_N``
(``transformer_blocks_3/attn/to_out_0/kernel``, ``transformer_blocks_0/ff/net_0/proj/bias``,
``time_text_embed/timestep_embedder/linear_1/kernel``, RMSNorm weights as
``.../attn/norm_added_q/scale``), so a checkpoint converts by renaming and transposing
(``rft.weights.mmdit``).

Numerics: params are float32; ``dtype`` is the compute dtype (e.g. bfloat16); LayerNorm /
RMSNorm statistics and the attention softmax are always float32; outputs come back
float32. Attention uses ``jax.nn.dot_product_attention`` (``attention_implementation=
"cudnn"`` picks the fused GPU kernel in bf16/fp16). ``remat=True`` rematerialises each
transformer block in the backward pass. Checked against diffusers to <= 1e-4 in
``tests/test_mmdit.py``.

Not supported (``MMDiTConfig`` raises ValueError): ``qk_norm`` other than None /
"rms_norm"; ``caption_projection_dim`` different from ``num_attention_heads *
attention_head_dim`` (diffusers cannot run that either). The forward pass has no
ControlNet residuals, IP-Adapter, ``skip_layers`` or attention masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MMDiTConfig", "SD3Transformer", "JointTransformerBlock", "JointAttention",
           "sincos_pos_embed", "sincos_1d", "grid_coords",
           "timestep_sincos"]

_EPS = 1e-6
_TIME_CHANNELS = 256
_QK_NORMS = (None, "rms_norm")
_CLASS_NAME = "SD3Transformer2DModel"


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Architecture of an :class:`SD3Transformer` (hashable); fields are the diffusers
  ``SD3Transformer2DModel`` config keys, with its defaults.

  ``out_channels=None`` means ``in_channels``. ``dual_attention_layers`` lists the blocks
  with the SD3.5-Medium second (image-only) attention.
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: Optional[int] = 16
  pos_embed_max_size: Optional[int] = 96
  dual_attention_layers: Tuple[int, ...] = ()
  qk_norm: Optional[str] = None

  def __post_init__(self):
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)
    dual = self.dual_attention_layers
    if isinstance(dual, int) or not hasattr(dual, "__iter__"):
      raise ValueError(f"MMDiTConfig: dual_attention_layers={dual!r} must be a list of block "
                       "indices")
    object.__setattr__(self, "dual_attention_layers", tuple(sorted({int(i) for i in dual})))
    for name in ("sample_size", "patch_size", "in_channels", "num_layers",
                 "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                 "caption_projection_dim", "pooled_projection_dim", "out_channels"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"MMDiTConfig: {name}={v!r} must be an integer >= 1")
    if self.pos_embed_max_size is not None and (
        not isinstance(self.pos_embed_max_size, (int, np.integer)) or self.pos_embed_max_size < 1):
      raise ValueError(f"MMDiTConfig: pos_embed_max_size={self.pos_embed_max_size!r} must be "
                       "an integer >= 1 or None")
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f"MMDiTConfig: qk_norm={self.qk_norm!r} is not supported (only "
                       f"{list(_QK_NORMS)})")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"MMDiTConfig: dual_attention_layers={list(self.dual_attention_layers)}"
                       f" has indices {bad} outside [0, num_layers={self.num_layers})")
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(
          f"MMDiTConfig: caption_projection_dim={self.caption_projection_dim} must equal "
          f"num_attention_heads * attention_head_dim = {self.inner_dim} (the text stream "
          "shares the blocks' width)")
    if self.inner_dim % 4:
      raise ValueError(f"MMDiTConfig: the width num_attention_heads * attention_head_dim = "
                       f"{self.inner_dim} must be divisible by 4 (2D sin-cos table)")

  @property
  def inner_dim(self) -> int:
    """The transformer width ``num_attention_heads * attention_head_dim``."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def base_size(self) -> int:
    """``sample_size // patch_size``: the grid size the sin-cos coordinates are scaled to."""
    return self.sample_size // self.patch_size

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "MMDiTConfig":
    """Builds the config from a diffusers ``SD3Transformer2DModel`` ``config.json`` dict.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``)
    are ignored, except that ``_class_name``, when present, must be
    ``SD3Transformer2DModel``. Raises ValueError naming any unknown key and any value this
    module does not implement (e.g. ``qk_norm="layer_norm"``).
    """
    d = dict(d)
    name = d.get("_class_name", _CLASS_NAME)
    if name != _CLASS_NAME:
      raise ValueError(f"MMDiTConfig.from_diffusers: _class_name={name!r} is not supported "
                       f"(only {_CLASS_NAME!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in d.items():
      if key.startswith("_"):
        continue
      if key not in fields:
        raise ValueError(f"MMDiTConfig.from_diffusers: unsupported config key {key}={value!r}")
      kw[key] = value
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """The diffusers config dict (``SD3Transformer2DModel(**to_diffusers())``)."""
    d = dataclasses.asdict(self)
    d["dual_attention_layers"] = list(self.dual_attention_layers)
    return d


# ----------------------------------------------------------------------------- embeddings


def sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
  """``[sin(pos ω), cos(pos ω)]`` ``[len(pos), dim]``, ``ω_k = 10000^(-k/(dim/2))``; float64
  frequencies as diffusers ``get_1d_sincos_pos_embed_from_grid``."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def grid_coords(n: int, base_size: int) -> np.ndarray:
  """The ``n`` grid coordinates ``i / (n / base_size)`` in float32, as diffusers."""
  return np.arange(n, dtype=np.float32) / np.float32(n / base_size)


def sincos_pos_embed(height: int, width: int, dim: int, *, base_size: int,
                     max_size: Optional[int] = None) -> np.ndarray:
  """The SD3 position table for a ``height × width`` patch grid, ``[height*width, dim]``
  float32 (row-major over patches).

  With ``max_size``: the centre ``height × width`` crop of the ``max_size × max_size``
  table (diffusers ``PatchEmbed.cropped_pos_embed``); else the table of the grid itself.
  Grid coordinates are ``i / (grid / base_size)`` in float32; the first ``dim/2`` channels
  encode the column, the rest the row.
  """
  if dim % 4:
    raise ValueError(f"sincos_pos_embed: dim={dim} must be divisible by 4")
  if max_size is not None:
    if height > max_size or width > max_size:
      raise ValueError(f"latent of {height}x{width} patches is larger than "
                       f"pos_embed_max_size={max_size} patches")
    top, left = (max_size - height) // 2, (max_size - width) // 2
    coord = grid_coords(max_size, base_size)
    rows, cols = coord[top:top + height], coord[left:left + width]
  else:
    rows, cols = grid_coords(height, base_size), grid_coords(width, base_size)
  emb_col = sincos_1d(cols, dim // 2)  # [W, dim/2]
  emb_row = sincos_1d(rows, dim // 2)  # [H, dim/2]
  table = np.concatenate([np.broadcast_to(emb_col[None], (height, width, dim // 2)),
                          np.broadcast_to(emb_row[:, None], (height, width, dim // 2))], axis=-1)
  return table.reshape(height * width, dim).astype(np.float32)


def timestep_sincos(t, dim: int = _TIME_CHANNELS, max_period: float = 10000.0):
  """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``:
  ``[cos(t f), sin(t f)]``, ``f_i = exp(-ln(max_period) i / (dim/2))``, float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features: int, dtype, name: str):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(x, eps: float = _EPS):
  """LayerNorm without affine params over the last axis, statistics in float32; returns
  ``x.dtype``."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
  return (xc * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """diffusers ``RMSNorm(dim, eps=1e-6)`` over the last axis: ``x / rms(x) * scale``,
  statistics in float32; returns ``x.dtype``."""

  epsilon: float = _EPS

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(x.dtype)


class PatchEmbed(nn.Module):
  """diffusers ``PatchEmbed`` (SD3 cropping): ``[B,H,W,C]`` -> ``[B, (H/p)(W/p), D]``
  tokens, a p×p stride-p conv plus the sin-cos table."""

  config: MMDiTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    p = cfg.patch_size
    b, hh, ww, _ = x.shape
    if hh % p or ww % p:
      raise ValueError(f"latent size {hh}x{ww} is not divisible by patch_size={p}")
    x = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="proj")(x.astype(self.dtype))
    h, w = hh // p, ww // p
    pos = sincos_pos_embed(h, w, cfg.inner_dim, base_size=cfg.base_size,
                           max_size=cfg.pos_embed_max_size)
    x = x.reshape(b, h * w, cfg.inner_dim)
    return (x.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(self.dtype)


class _MLP(nn.Module):
  """``linear_2(silu(linear_1(x)))`` (diffusers ``TimestepEmbedding`` and
  ``PixArtAlphaTextProjection(act_fn="silu")``)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(_dense(self.features, self.dtype, "linear_1")(x))
    return _dense(self.features, self.dtype, "linear_2")(x)


class TimestepTextEmbed(nn.Module):
  """diffusers ``CombinedTimestepTextProjEmbeddings``: ``MLP(sincos_256(t)) +
  MLP(pooled)``."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t, pooled):
    t_emb = timestep_sincos(t).astype(self.dtype)
    t_emb = _MLP(self.features, self.dtype, name="timestep_embedder")(t_emb)
    p_emb = _MLP(self.features, self.dtype, name="text_embedder")(pooled.astype(self.dtype))
    return t_emb + p_emb


class AdaLNModulation(nn.Module):
  """The ``linear(silu(emb))`` of diffusers' adaptive norms, split into ``chunks`` vectors
  ``[B, D]`` (AdaLayerNormZero: 6, SD35AdaLayerNormZeroX: 9, AdaLayerNormContinuous: 2).
  Named like the diffusers norm module (``norm1``, ``norm1_context``, ``norm_out``), with
  its Dense ``linear``."""

  features: int
  chunks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb):
    out = _dense(self.chunks * self.features, self.dtype, "linear")(nn.silu(emb))
    return jnp.split(out, self.chunks, axis=-1)


def _modulate(x, shift, scale):
  return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class _GELUProj(nn.Module):
  """diffusers ``GELU(approximate="tanh")`` layer: ``gelu_tanh(proj(x))``."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.features, self.dtype, "proj")(x), approximate=True)


class FFN(nn.Module):
  """diffusers ``FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")``:
  ``net_2(gelu_tanh(net_0/proj(x)))``, hidden width 4·D."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _GELUProj(4 * self.features, self.dtype, name="net_0")(x)
    return _dense(self.features, self.dtype, "net_2")(h)


class JointAttention(nn.Module):
  """diffusers ``Attention`` with ``JointAttnProcessor2_0``.

  ``__call__(x, y=None)``: image tokens ``x [B,N,D]`` and, when ``joint``, text tokens
  ``y [B,L,D]`` through their own q/k/v projections (``add_{q,k,v}_proj``), concatenated
  along the sequence for one softmax attention, then split back: returns ``(out_x,
  out_y)`` with ``out_y = to_add_out(o_y)``, or ``None`` for ``out_y`` when
  ``context_pre_only`` (the text queries are then not needed and are skipped; their
  params still exist, as in the checkpoint). Without ``joint`` (the dual ``attn2``):
  self-attention over ``x`` only, returns ``out_x``. ``qk_norm="rms_norm"`` RMS-normalises
  every head's queries and keys (``norm_q`` / ``norm_k`` / ``norm_added_q`` /
  ``norm_added_k``).
  """

  heads: int
  head_dim: int
  joint: bool = True
  context_pre_only: bool = False
  qk_norm: Optional[str] = None
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None

  def _qkv(self, x, prefix: str, norm_prefix: str, with_q: bool = True):
    b, n, _ = x.shape
    inner = self.heads * self.head_dim
    names = ("q", "k", "v")
    out = []
    for name in names:
      mod = (f"to_{name}" if prefix == "to" else f"add_{name}_proj")
      t = _dense(inner, self.dtype, mod)(x).reshape(b, n, self.heads, self.head_dim)
      if self.qk_norm is not None and name in ("q", "k"):
        t = RMSNorm(name=f"{norm_prefix}{name}")(t)
      out.append(t)
    if not with_q:  # the projection (and its params) exist; XLA drops the unused values
      out[0] = None
    return out

  @nn.compact
  def __call__(self, x, y=None):
    b, n, d = x.shape
    q, k, v = self._qkv(x, "to", "norm_")
    if self.joint:
      qy, ky, vy = self._qkv(y, "add", "norm_added_", with_q=not self.context_pre_only)
      k = jnp.concatenate([k, ky], axis=1)
      v = jnp.concatenate([v, vy], axis=1)
      if not self.context_pre_only:
        q = jnp.concatenate([q, qy], axis=1)
    o = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_implementation)
    o = o.reshape(b, o.shape[1], self.heads * self.head_dim)
    out_x = _dense(d, self.dtype, "to_out_0")(o[:, :n])
    if not self.joint:
      return out_x
    if self.context_pre_only:
      return out_x, None
    return out_x, _dense(d, self.dtype, "to_add_out")(o[:, n:])


class JointTransformerBlock(nn.Module):
  """diffusers ``JointTransformerBlock`` (see the module docstring):
  ``(x, y, c) -> (x', y')``, ``y'`` None when ``context_pre_only``."""

  dim: int
  heads: int
  head_dim: int
  context_pre_only: bool = False
  qk_norm: Optional[str] = None
  use_dual_attention: bool = False
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, y, c):
    dt = self.dtype
    if self.use_dual_attention:
      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2,
       scale_msa2, gate_msa2) = AdaLNModulation(self.dim, 9, dt, name="norm1")(c)
    else:
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
          self.dim, 6, dt, name="norm1")(c)
    x_normed = layer_norm(x)
    nx = x_normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
    if self.context_pre_only:
      scale_y, shift_y = AdaLNModulation(self.dim, 2, dt, name="norm1_context")(c)
      ny = _modulate(y, shift_y, scale_y)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
          AdaLNModulation(self.dim, 6, dt, name="norm1_context")(c))
      ny = _modulate(y, c_shift_msa, c_scale_msa)

    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm, dtype=dt,
                   attention_implementation=self.attention_implementation)
    ax, ay = JointAttention(joint=True, context_pre_only=self.context_pre_only, name="attn",
                            **attn_kw)(nx, ny)
    x = x + gate_msa[:, None] * ax
    if self.use_dual_attention:
      nx2 = x_normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
      x = x + gate_msa2[:, None] * JointAttention(joint=False, name="attn2", **attn_kw)(nx2)
    x = x + gate_mlp[:, None] * FFN(self.dim, dt, name="ff")(_modulate(x, shift_mlp, scale_mlp))

    if self.context_pre_only:
      return x, None
    y = y + c_gate_msa[:, None] * ay
    y = y + c_gate_mlp[:, None] * FFN(self.dim, dt, name="ff_context")(
        _modulate(y, c_shift_mlp, c_scale_mlp))
    return x, y


class SD3Transformer(nn.Module):
  """The SD3 / SD3.5 MMDiT denoiser (diffusers ``SD3Transformer2DModel``), NHWC.

  ``__call__(hidden_states [B,H,W,in_channels], timestep [B] (or a scalar) on diffusers'
  0..1000 scale, encoder_hidden_states [B,L,joint_attention_dim], pooled_projections
  [B,pooled_projection_dim]) -> [B,H,W,out_channels]`` float32 (the flow-matching velocity
  prediction for SD3 pipelines). H and W must be multiples of ``patch_size`` and, with
  ``pos_embed_max_size``, at most ``pos_embed_max_size * patch_size``.
  """

  config: MMDiTConfig
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
    cfg = self.config
    dt = self.dtype
    b, hh, ww, _ = hidden_states.shape
    p = cfg.patch_size
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
    x = PatchEmbed(cfg, dt, name="pos_embed")(hidden_states)
    c = TimestepTextEmbed(cfg.inner_dim, dt, name="time_text_embed")(timestep,
                                                                    pooled_projections)
    y = _dense(cfg.caption_projection_dim, dt, "context_embedder")(
        encoder_hidden_states.astype(dt))
    block = nn.remat(JointTransformerBlock) if self.remat else JointTransformerBlock
    for i in range(cfg.num_layers):
      x, y = block(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim,
                   context_pre_only=i == cfg.num_layers - 1, qk_norm=cfg.qk_norm,
                   use_dual_attention=i in cfg.dual_attention_layers, dtype=dt,
                   attention_implementation=self.attention_implementation,
                   name=f"transformer_blocks_{i}")(x, y, c)
    scale, shift = AdaLNModulation(cfg.inner_dim, 2, dt, name="norm_out")(c)
    x = _modulate(x, shift, scale)
    x = _dense(p * p * cfg.out_channels, dt, "proj_out")(x)
    h, w = hh // p, ww // p
    x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh, ww, cfg.out_channels).astype(jnp.float32)
