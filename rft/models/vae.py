"""Stable-Diffusion ``AutoencoderKL`` (the latent VAE) as a Flax linen module, NHWC.

Follows ``diffusers.AutoencoderKL`` (``models/autoencoders/autoencoder_kl.py``,
``Encoder`` / ``Decoder`` in ``autoencoders/vae.py``, ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` / ``UNetMidBlock2D`` in ``unets/unet_2d_blocks.py``,
``ResnetBlock2D`` in ``resnet.py``, the single-head ``Attention`` with ``AttnProcessor2_0``)::

  encode: x [B,H,W,in] ─► conv_in ─► down_blocks_i: layers_per_block × ResnetBlock
          (+ Downsample: pad (0,1) bottom/right, 3x3 stride-2 VALID conv; not on the last)
          ─► mid_block (Resnet, Attention, Resnet) ─► GroupNorm, SiLU, conv_out (2·latent)
          ─► quant_conv (1x1) ─► (mean, logvar) split on channels, logvar clipped to
          [-30, 20] (``DiagonalGaussianDistribution``)
  decode: z [B,h,w,latent] ─► post_quant_conv (1x1) ─► conv_in ─► mid_block
          ─► up_blocks_i (channels reversed): (layers_per_block + 1) × ResnetBlock
          (+ Upsample: nearest x2, 3x3 conv; not on the last) ─► GroupNorm, SiLU, conv_out

ResnetBlock: ``x + conv2(silu(gn2(conv1(silu(gn1(x))))))``, the skip through a 1x1
``conv_shortcut`` when the channel count changes. Attention: one head of width C over the
h·w pixels, ``x + to_out(softmax(q kᵀ / √C) v)`` with q, k, v Dense of ``GroupNorm(x)``.
Every GroupNorm has eps 1e-6 and ``norm_num_groups`` groups.

Parameter names mirror the diffusers module names with ``.N.`` written ``_N``
(``encoder/down_blocks_0/resnets_1/conv1/kernel``,
``decoder/mid_block/attentions_0/to_out_0/kernel``), so a checkpoint converts by renaming
and transposing (``rft.weights.vae``).

Numerics: params are float32; ``dtype`` is the compute dtype (e.g. bfloat16); GroupNorm
statistics and the attention softmax are always float32; outputs come back float32.
Attention uses ``jax.nn.dot_product_attention`` (pass ``attention_implementation="cudnn"``
for the fused GPU kernel in bf16/fp16). ``remat=True`` rematerialises every ResnetBlock
and attention block in the backward pass, for reward backprop through the decoder at
512x512. Checked against diffusers to <= 1e-4 in ``tests/test_vae.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["VAEConfig", "AutoencoderKL", "GroupNorm", "ResnetBlock", "SpatialAttention"]

_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)

# diffusers config keys that do not change the computation.
_HARMLESS_KEYS = ("sample_size", "force_upcast")
_ACTIVATIONS = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and latent scaling of an :class:`AutoencoderKL` (hashable).

  ``scaling_factor`` / ``shift_factor`` map VAE latents to diffusion latents:
  ``latents = (z - shift_factor) * scaling_factor`` (SD 1.x/2.x: 0.18215 and 0;
  SDXL: 0.13025; SD3 / Flux set a shift).
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("VAEConfig: block_out_channels is empty")
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"VAEConfig: {name}={getattr(self, name)!r} must be >= 1")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must all be "
                       f"divisible by norm_num_groups={self.norm_num_groups} (not {bad})")

  @property
  def downscale(self) -> int:
    """Image size / latent size (2 per level after the first)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Keys starting with ``_`` and ``sample_size`` / ``force_upcast`` are ignored. Raises
    ValueError naming the key and value of any setting this module does not implement
    (other block types, activations, ``latents_mean`` / ``latents_std``, unknown keys).
    """
    d = dict(d)
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"VAEConfig.from_diffusers: _class_name={name!r} is not supported "
                       "(only 'AutoencoderKL')")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in d.items():
      if key.startswith("_") or key in _HARMLESS_KEYS:
        continue
      if key in fields:
        kw[key] = value
      elif key == "act_fn":
        if value not in _ACTIVATIONS:
          raise ValueError(f"VAEConfig.from_diffusers: act_fn={value!r} is not supported "
                           f"(only {list(_ACTIVATIONS)})")
      elif key in ("down_block_types", "up_block_types"):
        want = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
        if not isinstance(value, (list, tuple)) or any(t != want for t in value):
          raise ValueError(f"VAEConfig.from_diffusers: {key}={value!r} is not supported "
                           f"(only {want!r} blocks)")
      elif key in ("latents_mean", "latents_std"):
        if value is not None:
          raise ValueError(f"VAEConfig.from_diffusers: {key}={value!r} is not supported "
                           "(per-channel latent normalisation); only null")
      else:
        raise ValueError(f"VAEConfig.from_diffusers: unsupported config key {key}={value!r}")
    if kw.get("shift_factor") is None:
      kw.pop("shift_factor", None)
    if kw.get("scaling_factor") is None:
      kw.pop("scaling_factor", None)
    config = cls(**kw)
    n = len(config.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if key in d and len(d[key]) != n:
        raise ValueError(f"VAEConfig.from_diffusers: {key} has {len(d[key])} entries but "
                         f"block_out_channels {config.block_out_channels} has {n}")
    return config

  def to_diffusers(self) -> dict:
    """The diffusers ``AutoencoderKL`` config dict (``AutoencoderKL(**to_diffusers())``)."""
    n = len(self.block_out_channels)
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    d.update(act_fn="silu", down_block_types=["DownEncoderBlock2D"] * n,
             up_block_types=["UpDecoderBlock2D"] * n)
    return d


class GroupNorm(nn.Module):
  """``torch.nn.GroupNorm`` over NHWC, statistics in float32 (two-pass variance).

  Params ``scale`` / ``bias`` ``[C]``; returns the input's dtype.
  """

  num_groups: int
  epsilon: float = _EPS

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    g = self.num_groups
    xf = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    xc = xf - mean
    var = jnp.mean(jnp.square(xc), axis=(1, 2, 4), keepdims=True)
    y = (xc * jax.lax.rsqrt(var + self.epsilon)).reshape(b, h, w, c)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return (y * scale + bias).astype(x.dtype)


def _conv(features: int, kernel: int, dtype, name: str, strides: int = 1, padding="SAME"):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """diffusers ``ResnetBlock2D`` without time embedding (eps 1e-6, no output scaling)."""

  out_channels: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(GroupNorm(self.num_groups, name="norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(GroupNorm(self.num_groups, name="norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x.astype(self.dtype) + h


class SpatialAttention(nn.Module):
  """Single-head self-attention over pixels with GroupNorm and a residual.

  diffusers ``Attention(heads=1, dim_head=C, norm_num_groups, residual_connection=True)``:
  ``x + to_out_0(softmax(q kᵀ / √C) v)``, ``q = to_q(GroupNorm(x))`` etc.; softmax in
  float32.
  """

  num_groups: int
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = GroupNorm(self.num_groups, name="group_norm")(x).reshape(b, hh * ww, 1, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    o = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_implementation)
    o = dense("to_out_0")(o.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)
    return x.astype(self.dtype) + o


def _blocks(remat: bool):
  if remat:
    return nn.remat(ResnetBlock), nn.remat(SpatialAttention)
  return ResnetBlock, SpatialAttention


class MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` (one layer): Resnet, [Attention], Resnet."""

  channels: int
  num_groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    res, attn = _blocks(self.remat)
    x = res(self.channels, self.num_groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = attn(self.num_groups, self.dtype, self.attention_implementation,
               name="attentions_0")(x)
    return res(self.channels, self.num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """diffusers ``Downsample2D(padding=0)``: pad bottom/right by 1, 3x3 stride-2 conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.channels, 3, self.dtype, "conv", strides=2,
                 padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """diffusers ``Upsample2D``: nearest-neighbour x2, then a 3x3 conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, self.dtype, "conv")(x)


class DownEncoderBlock(nn.Module):
  """diffusers ``DownEncoderBlock2D``: ``num_layers`` ResnetBlocks, then a Downsample."""

  channels: int
  num_layers: int
  num_groups: int
  add_downsample: bool
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    res, _ = _blocks(self.remat)
    for j in range(self.num_layers):
      x = res(self.channels, self.num_groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """diffusers ``UpDecoderBlock2D``: ``num_layers`` ResnetBlocks, then an Upsample."""

  channels: int
  num_layers: int
  num_groups: int
  add_upsample: bool
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    res, _ = _blocks(self.remat)
    for j in range(self.num_layers):
      x = res(self.channels, self.num_groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """diffusers ``Encoder`` with ``double_z=True``: image -> ``2 * latent`` moments."""

  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
    for i, c in enumerate(chans):
      x = DownEncoderBlock(c, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1,
                           self.dtype, self.remat, name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                 self.attention_implementation, self.remat, name="mid_block")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, name="conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """diffusers ``Decoder`` (group norm): latent -> image."""

  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                 self.attention_implementation, self.remat, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups,
                         i < len(chans) - 1, self.dtype, self.remat, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, name="conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The SD latent VAE. NHWC throughout; images in [-1, 1].

  ``__call__(x)`` = ``decode(mean of encode(x))`` (a reconstruction; used by ``init``).
  Apply a method with ``module.apply({"params": p}, z, method="latents_to_images")``.
  """

  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: Optional[str] = None
  remat: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, attention_implementation=self.attention_implementation,
              remat=self.remat)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

  def encode(self, x) -> Tuple[jax.Array, jax.Array]:
    """``x [B,H,W,in]`` -> ``(mean, logvar)`` ``[B,H/f,W/f,latent]`` float32 (f =
    ``config.downscale``), logvar clipped to [-30, 20] as in diffusers."""
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, z) -> jax.Array:
    """VAE latent ``z [B,h,w,latent]`` -> image ``[B,h·f,w·f,out]`` float32 (unclipped)."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def latents_to_images(self, latents) -> jax.Array:
    """Diffusion latents -> images: ``decode(latents / scaling_factor + shift_factor)``."""
    cfg = self.config
    return self.decode(jnp.asarray(latents, jnp.float32) / cfg.scaling_factor
                       + cfg.shift_factor)

  def images_to_latents(self, x, key: Optional[jax.Array] = None) -> jax.Array:
    """Images -> diffusion latents ``(z - shift_factor) * scaling_factor``, with ``z`` the
    posterior mean, or a sample ``mean + exp(logvar / 2) * eps`` when ``key`` is given."""
    mean, logvar = self.encode(x)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    cfg = self.config
    return (z - cfg.shift_factor) * cfg.scaling_factor

  def __call__(self, x):
    return self.decode(self.encode(x)[0])
