"""A small text-conditioned UNet for low-resolution images (NHWC), sized for CPU.

Layout (defaults: ``channels=(32, 64, 64)``, one ResBlock per level):

  conv_in ─► level 0 (16x16, 32ch) ─► down ─► level 1 (8x8, 64ch, cross-attn)
          ─► down ─► level 2 (4x4, 64ch, self+cross-attn) ─► mid (Res, self+cross, Res)
          ─► up path mirroring it, each ResBlock taking the matching down block's
             output concatenated ─► GroupNorm, SiLU, zero-init conv_out

``full_skips=True`` gives the guided-diffusion up path instead (conv_in and every
downsample output are skips too, ``num_res_blocks + 1`` up blocks per level): +32 %
params and +40 % train FLOPs for the default widths, mostly at 16x16.

Conditioning: a sinusoidal timestep embedding goes through an MLP; the mask-mean of the
text states, projected, is added to it (strong global conditioning); every ResBlock
applies it as FiLM (scale/shift after the second GroupNorm). Levels in ``attn_levels``
cross-attend to the text states with a key padding mask; levels in
``self_attn_levels`` also self-attend over pixels. No attention at the full resolution
by default: on CPU it costs more than it buys at 16x16. A prompt with no real token
(all pad: the CFG "empty prompt") contributes exactly nothing: zero cross-attention
output and a zero pooled vector.

``pos_emb=True`` adds a learned embedding per pixel position to every attention block's
normalised inputs (see ``AttentionBlock``); off in the shipped base. Measured at 2,500
pretraining steps it did not help captions with positions (README, "Where the headroom
is").

Resolution-agnostic (without ``pos_emb``): any H, W divisible by
``2 ** (len(channels) - 1)`` works.
Speeds: ``benchmarks/unet_speed.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rft.models.text_encoder import MultiHeadAttention


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (integer or float) timesteps ``t [B]`` -> ``[B, dim]``."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    t = t[None]
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def masked_mean(states, mask):
  """Mean of ``states [B, L, D]`` over positions where ``mask [B, L]``; 0 if none."""
  m = mask.astype(states.dtype)[..., None]
  total = jnp.sum(states * m, axis=1)
  count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return total / count


def _groups(num_groups: int, channels: int) -> int:
  g = min(num_groups, channels)
  while channels % g:
    g -= 1
  return g


class GroupNorm(nn.Module):
  """GroupNorm over NHWC, written for speed on CPU XLA.

  Same math and parameter names (``scale``, ``bias``) as ``flax.linen.GroupNorm``, but
  the statistics are per-channel means of x and x**2 (reductions over H, W) combined per
  group, and the normalisation is one fused ``x * a + d`` with per-(batch, channel)
  ``a``, ``d``. About 1.7x faster than ``nn.GroupNorm`` fwd+bwd on 2 CPU cores.
  """

  num_groups: int = 8
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    g = _groups(self.num_groups, c)
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    s1 = jnp.mean(xf, axis=axes)  # [B, C]
    s2 = jnp.mean(jnp.square(xf), axis=axes)
    mean = s1.reshape(s1.shape[0], g, c // g).mean(-1)  # [B, G]
    var = jnp.maximum(s2.reshape(s2.shape[0], g, c // g).mean(-1) - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    a = jnp.repeat(inv, c // g, axis=1) * scale  # [B, C]
    d = bias - jnp.repeat(mean, c // g, axis=1) * a
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
    return (xf * a.reshape(bshape) + d.reshape(bshape)).astype(x.dtype)


class ResBlock(nn.Module):
  """GN-SiLU-conv, GN + FiLM(emb) - SiLU - conv, plus a (1x1-projected) skip."""

  out_channels: int
  num_groups: int = 8

  @nn.compact
  def __call__(self, x, emb):
    c = self.out_channels
    h = GroupNorm(self.num_groups, name="norm1")(x)
    h = nn.silu(h)
    h = nn.Conv(c, (3, 3), name="conv1")(h)
    ss = nn.Dense(2 * c, name="emb_proj")(nn.silu(emb))
    scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
    h = GroupNorm(self.num_groups, name="norm2")(h)
    h = h * (1.0 + scale) + shift
    h = nn.silu(h)
    h = nn.Conv(c, (3, 3), name="conv2")(h)
    if x.shape[-1] != c:
      x = nn.Dense(c, name="skip")(x)  # a 1x1 conv
    return x + h


class AttentionBlock(nn.Module):
  """Optional self-attention over pixels, then cross-attention to the text; residual.

  pos_emb: a learned embedding per pixel position [H*W, C] (init N(0, 0.02^2)) is added
  to the normalised attention inputs (queries and self-attention keys), not to the
  residual stream: a query then knows where it is, so a caption's position words ("at
  the top left", "to the left of") can be matched by location. Without it the only
  position signal is the convolutions' zero padding.
  """

  num_heads: int = 4
  self_attn: bool = False
  pos_emb: bool = False

  @nn.compact
  def __call__(self, x, context, context_mask):
    b, hh, ww, c = x.shape
    tokens = x.reshape(b, hh * ww, c)
    pe = (self.param("pos_emb", nn.initializers.normal(0.02), (hh * ww, c), jnp.float32)
          .astype(x.dtype) if self.pos_emb else 0.0)
    if self.self_attn:
      h = nn.LayerNorm(name="ln_self")(tokens) + pe
      tokens = tokens + MultiHeadAttention(self.num_heads, name="self_attn")(h, h)
    h = nn.LayerNorm(name="ln_cross")(tokens) + pe
    tokens = tokens + MultiHeadAttention(self.num_heads, name="cross_attn")(
        h, context, context_mask)
    return tokens.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), name="conv")(x)


class Upsample(nn.Module):
  """Nearest 2x upsampling, then a 3x3 conv to ``out_channels``."""

  out_channels: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    x = x.reshape(b, 2 * h, 2 * w, c)
    return nn.Conv(self.out_channels, (3, 3), name="conv")(x)


class UNet(nn.Module):
  """Text-conditioned epsilon (or v) predictor.

  ``__call__(x [B,H,W,C], t [B], context [B,L,D], context_mask [B,L]) -> [B,H,W,out]``.
  """

  channels: Sequence[int] = (32, 64, 64)
  num_res_blocks: int = 1
  attn_levels: Sequence[int] = (1, 2)
  self_attn_levels: Sequence[int] = (2,)
  mid_attn: bool = True
  full_skips: bool = False
  num_heads: int = 4
  emb_dim: int = 128
  num_groups: int = 8
  out_channels: int = 3
  pos_emb: bool = False  # learned position embeddings in every attention block

  @nn.compact
  def __call__(self, x, t, context, context_mask):
    chans = tuple(self.channels)
    nlev = len(chans)
    if x.ndim != 4:
      raise ValueError(f"UNet expects x of shape [B, H, W, C], got {x.shape}")
    factor = 2 ** (nlev - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"UNet with {nlev} levels needs H and W divisible by {factor}, "
          f"got x of shape {x.shape}")
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    if context.ndim != 3 or context_mask.shape != context.shape[:2]:
      raise ValueError(
          f"UNet expects context [B, L, D] and context_mask [B, L], got "
          f"{context.shape} and {context_mask.shape}")
    context_mask = context_mask.astype(bool)

    # Conditioning vector: timestep MLP + projected pooled text.
    emb = timestep_embedding(t, chans[0] * 2)
    emb = nn.Dense(self.emb_dim, name="t_fc1")(emb)
    emb = nn.Dense(self.emb_dim, name="t_fc2")(nn.silu(emb))
    pooled = masked_mean(context, context_mask)
    emb = emb + nn.Dense(self.emb_dim, name="text_pool_proj")(pooled)

    def attn(h, level, name):
      if level in self.attn_levels:
        return AttentionBlock(self.num_heads, level in self.self_attn_levels, self.pos_emb,
                              name=name)(h, context, context_mask)
      return h

    # Down path.
    h = nn.Conv(chans[0], (3, 3), name="conv_in")(x)
    skips = [h] if self.full_skips else []
    for lvl, c in enumerate(chans):
      for i in range(self.num_res_blocks):
        h = ResBlock(c, self.num_groups, name=f"down{lvl}_res{i}")(h, emb)
        h = attn(h, lvl, f"down{lvl}_attn{i}")
        skips.append(h)
      if lvl != nlev - 1:
        h = Downsample(name=f"down{lvl}_downsample")(h)
        if self.full_skips:
          skips.append(h)

    # Middle.
    h = ResBlock(chans[-1], self.num_groups, name="mid_res0")(h, emb)
    if self.mid_attn:
      h = AttentionBlock(self.num_heads, True, self.pos_emb, name="mid_attn")(
          h, context, context_mask)
    h = ResBlock(chans[-1], self.num_groups, name="mid_res1")(h, emb)

    # Up path.
    for lvl in reversed(range(nlev)):
      c = chans[lvl]
      for i in range(self.num_res_blocks + int(self.full_skips)):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(c, self.num_groups, name=f"up{lvl}_res{i}")(h, emb)
        h = attn(h, lvl, f"up{lvl}_attn{i}")
      if lvl != 0:
        h = Upsample(chans[lvl - 1], name=f"up{lvl}_upsample")(h)
    assert not skips

    h = GroupNorm(self.num_groups, name="norm_out")(h)
    h = nn.silu(h)
    return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, name="conv_out")(h)
