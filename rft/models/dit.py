"""A small text-conditioned DiT (Peebles & Xie 2023) for rectified-flow ShapesWorld.

``DiT(x [B,H,W,C], t [B], context [B,L,D], context_mask [B,L]) -> [B,H,W,out]``:

  patchify (p x p patches, a Dense to `width`) + fixed 2D sin-cos position embeddings
  -> `depth` blocks -> adaLN final layer -> Dense to p*p*out (zero-init) -> unpatchify

Each block (adaLN-Zero, DiT's best variant, plus PixArt-alpha's text cross-attention):

  shift1, scale1, gate1, shift2, scale2, gate2 = Dense_zero(silu(c))
  h = h + gate1 * SelfAttn(LN(h) * (1 + scale1) + shift1)
  h = h + CrossAttn(LN(h), text states, mask)
  h = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)

with LayerNorms without affine parameters where adaLN modulates them. The conditioning
vector c is the timestep's sinusoidal embedding through an MLP plus the projected
mask-mean of the text states (a prompt with no real token contributes nothing, as in
the UNet). The modulation and output layers start at zero, so a fresh DiT is the zero
map and each block starts as the identity.

`TextToImageDiT` pairs it with the ShapesWorld text encoder; it has the same `encode` /
`denoise` methods as `rft.models.t2i.TextToImage`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rft.models.t2i import TEXT_KEYS, fields_from_sections, module_config, text_encoder
from rft.models.text_encoder import MultiHeadAttention
from rft.models.unet import masked_mean, timestep_embedding


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed 2D sin-cos position embeddings [height*width, dim] (MAE / DiT): half the
  channels encode the row, half the column, each as 1D sin-cos with base 10000."""
  if dim % 4:
    raise ValueError(f"2D sin-cos position embeddings need width % 4 == 0, got {dim}")

  def one_d(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing="ij")
  return np.concatenate([one_d(rows, dim // 2), one_d(cols, dim // 2)], 1).astype(np.float32)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, h, c, context, context_mask):
    width = h.shape[-1]
    mod = nn.Dense(6 * width, kernel_init=nn.initializers.zeros, name="adaln")(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    x = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="ln1")(h), shift1, scale1)
    h = h + gate1[:, None] * MultiHeadAttention(self.num_heads, name="self_attn")(x, x)
    x = nn.LayerNorm(name="ln_cross")(h)
    h = h + MultiHeadAttention(self.num_heads, name="cross_attn")(x, context, context_mask)
    x = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="ln2")(h), shift2, scale2)
    x = nn.Dense(self.mlp_ratio * width, name="mlp_in")(x)
    x = nn.Dense(width, name="mlp_out")(nn.gelu(x, approximate=True))
    return h + gate2[:, None] * x


class DiT(nn.Module):
  """Text-conditioned DiT; see the module docstring. out_channels: the prediction's."""

  patch: int = 2
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  out_channels: int = 3

  @nn.compact
  def __call__(self, x, t, context, context_mask):
    if x.ndim != 4:
      raise ValueError(f"DiT expects x of shape [B, H, W, C], got {x.shape}")
    b, hh, ww, ch = x.shape
    p = self.patch
    if hh % p or ww % p:
      raise ValueError(f"DiT with patch {p} needs H and W divisible by {p}, got {x.shape}")
    if context.ndim != 3 or context_mask.shape != context.shape[:2]:
      raise ValueError(f"DiT expects context [B, L, D] and context_mask [B, L], got "
                       f"{context.shape} and {context_mask.shape}")
    gh, gw = hh // p, ww // p
    tokens = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, gh * gw, p * p * ch)
    h = nn.Dense(self.width, name="patch_embed")(tokens)
    h = h + jnp.asarray(sincos_2d(gh, gw, self.width), h.dtype)[None]

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    c = timestep_embedding(t, self.width)
    c = nn.Dense(self.width, name="t_fc1")(c)
    c = nn.Dense(self.width, name="t_fc2")(nn.silu(c))
    context_mask = context_mask.astype(bool)
    c = c + nn.Dense(self.width, name="text_pool_proj")(masked_mean(context, context_mask))

    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, name=f"block{i}")(h, c, context, context_mask)

    shift, scale = jnp.split(nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros,
                                      name="final_adaln")(nn.silu(c)), 2, axis=-1)
    h = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="final_ln")(h), shift, scale)
    out = nn.Dense(p * p * self.out_channels, kernel_init=nn.initializers.zeros,
                   name="final_proj")(h)
    return out.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, hh, ww, self.out_channels)


_DIT_KEYS = {"patch": "patch", "width": "width", "depth": "depth", "num_heads": "num_heads",
             "mlp_ratio": "mlp_ratio", "out_channels": "out_channels"}


class TextToImageDiT(nn.Module):
  """ShapesWorld text encoder + DiT (`encode` / `denoise` as TextToImage's)."""

  family = "dit"  # recorded in base bundles (rft.pretrained.load_shapes_base); not a field

  vocab_size: int = 64
  max_len: int = 12
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_ratio: int = 4
  pad_id: int = 0
  patch: int = 2
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  out_channels: int = 3

  def setup(self):
    self.text = text_encoder(self)
    self.dit = DiT(self.patch, self.width, self.depth, self.num_heads, self.mlp_ratio,
                   self.out_channels)

  def encode(self, tokens):
    return self.text(tokens)

  def denoise(self, x, t, states, mask):
    return self.dit(x, t, states, mask)

  def __call__(self, x, t, tokens):
    states, mask = self.encode(tokens)
    return self.denoise(x, t, states, mask)

  @classmethod
  def from_config(cls, text: Mapping[str, Any] | None = None,
                  dit: Mapping[str, Any] | None = None) -> "TextToImageDiT":
    return cls(**fields_from_sections("TextToImageDiT", (("text", text, TEXT_KEYS),
                                                         ("dit", dit, _DIT_KEYS))))

  def config(self) -> dict:
    return module_config(self)
