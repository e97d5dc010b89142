"""A small bidirectional transformer text encoder for word-level prompts.

Used by the ShapesWorld text-to-image model: tokens ``[B, L]`` (int, pad id 0) go in,
per-token states ``[B, L, width]`` and the non-pad mask ``[B, L]`` come out. The UNet
cross-attends to the states under the mask, so whatever the encoder writes at pad
positions never reaches the image.

Pad handling: self-attention keys are masked on pad tokens. A row with no real token at
all (the empty prompt used for classifier-free guidance) would otherwise softmax over
nothing; ``masked_attention`` uses a large finite negative logit, and fully masked rows
get a zero attention output, so such rows stay finite (no NaN, forward or backward).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = -1e9


def masked_attention(q, k, v, key_mask):
  """Multi-head attention with a key padding mask, NaN-safe for fully masked rows.

  Args:
    q: ``[B, Q, H, Dh]`` queries.
    k, v: ``[B, K, H, Dh]`` keys and values.
    key_mask: ``[B, K]`` bool, True where the key may be attended; or None.

  Returns:
    ``[B, Q, H, Dh]``. Rows whose keys are all masked give exactly zero.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
  logits = logits.astype(jnp.float32)
  if key_mask is not None:
    m = key_mask[:, None, None, :]
    logits = jnp.where(m, logits, _NEG)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", w, v)
  if key_mask is not None:
    any_key = jnp.any(key_mask, axis=-1)  # [B]
    out = out * any_key[:, None, None, None].astype(out.dtype)
  return out


class MultiHeadAttention(nn.Module):
  """q from ``x``, k/v from ``context`` (self-attention when context is x)."""

  num_heads: int
  out_features: int | None = None

  @nn.compact
  def __call__(self, x, context, key_mask=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
          f"attention width {width} is not divisible by num_heads={self.num_heads}")
    dh = width // self.num_heads
    heads = lambda y: y.reshape(y.shape[:-1] + (self.num_heads, dh))
    q = heads(nn.Dense(width, use_bias=False, name="q")(x))
    k = heads(nn.Dense(width, use_bias=False, name="k")(context))
    v = heads(nn.Dense(width, use_bias=False, name="v")(context))
    out = masked_attention(q, k, v, key_mask)
    out = out.reshape(out.shape[:-2] + (width,))
    return nn.Dense(self.out_features or width, name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)); x + MLP(LN(x))."""

  num_heads: int = 4
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    h = nn.LayerNorm(name="ln1")(x)
    x = x + MultiHeadAttention(self.num_heads, name="attn")(h, h, mask)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(width * self.mlp_ratio, name="fc1")(h)
    h = nn.gelu(h)
    x = x + nn.Dense(width, name="fc2")(h)
    return x


class TextEncoder(nn.Module):
  """Token + learned position embedding, pre-LN transformer, final LayerNorm.

  ``__call__(tokens [B, L] int) -> (states [B, L, width] float32, mask [B, L] bool)``
  with ``mask = tokens != pad_id``. ``L`` may be anything up to ``max_len``.
  """

  vocab_size: int
  max_len: int
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  pad_id: int = 0

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2:
      raise ValueError(f"TextEncoder expects tokens of shape [B, L], got {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(
          f"TextEncoder: token length {length} exceeds max_len={self.max_len}")
    tokens = tokens.astype(jnp.int32)
    mask = tokens != self.pad_id
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.initializers.normal(0.02), name="tok_embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (self.max_len, self.width))
    x = x + pos[None, :length]
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, name=f"block{i}")(x, mask)
    x = nn.LayerNorm(name="ln_final")(x)
    return x, mask
