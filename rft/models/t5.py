"""T5 encoder in Flax: the ``transformers.T5EncoderModel`` layout (SD3's ``text_encoder_3``).

T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer") is a pre-norm transformer whose encoder is::

  x    = shared[input_ids]                             (no position embedding)
  x    = x + o(Attn(norm(x)))                          per block, then
  x    = x + FF(norm(x))
  out  = final_layer_norm(x)
  norm = RMS norm: w * x / sqrt(mean(x^2) + eps)       (no mean subtraction, no bias)
  Attn = softmax(q k^T + bias[h, i, j] [+ padding mask]) v   -- *no* 1/sqrt(d_kv) scaling
  FF   = wo(act(wi x))                                 ("relu", T5 v1.0)
       | wo(act(wi_0 x) * wi_1 x)                      ("gated-gelu", T5 v1.1 / T5-XXL)

* Relative position bias: ``bias[h, i, j] = relative_attention_bias[bucket(j - i), h]``
  with bidirectional log-spaced buckets (half of them for ``j > i``; within each half,
  ``num_buckets // 4`` exact small distances, then logarithmic bins up to
  ``relative_attention_max_distance``). Only the first block owns the embedding; its bias
  is reused by every later block.
* ``feed_forward_proj``: ``relu`` | ``gelu`` | ``silu`` | ``gated-relu`` | ``gated-gelu``
  | ``gated-silu``; as transformers does, ``gated-gelu`` uses ``gelu_new`` (tanh
  approximation) while plain ``gelu`` is exact (erf). ``d_kv * num_heads`` may differ
  from ``d_model``. Linear layers have no bias.

Parameter names mirror the torch keys (``block.N`` / ``layer.N`` -> ``block_N`` /
``layer_N``, Linear ``weight`` -> ``kernel`` transposed, T5LayerNorm ``weight`` ->
``scale``, Embedding ``weight`` -> ``embedding``)::

  shared/embedding                                              [vocab, d_model]
  encoder/block_0/layer_0/SelfAttention/{q,k,v,o}/kernel
  encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding  [buckets, heads]
  encoder/block_N/layer_0/layer_norm/scale
  encoder/block_N/layer_1/DenseReluDense/{wi | wi_0, wi_1, wo}/kernel
  encoder/block_N/layer_1/layer_norm/scale
  encoder/final_layer_norm/scale

Numerics: params float32; ``dtype`` is the compute dtype of the matmuls; the residual
stream, the norms' statistics, attention logits (with the bias) and softmax are float32,
and the output is float32. Checked against transformers to <= 1e-4 in ``tests/test_t5.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["T5Config", "T5EncoderModel", "relative_position_bucket", "param_count"]

Dtype = Any
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_ACTS = ("relu", "gelu", "gelu_new", "silu")
_FEED_FORWARD = ("relu", "gelu", "silu", "gated-relu", "gated-gelu", "gated-silu")
_MODEL_TYPES = ("t5", "mt5")


# ----------------------------------------------------------------------------- config


def _get(d: Mapping[str, Any], key: str, default: Any, kind=int) -> Any:
  v = d.get(key, default)
  if v is None:
    v = default
  if kind is int and isinstance(v, float) and not v.is_integer():
    raise ValueError(f"config key {key!r}: {v!r} is not an integer")
  try:
    return kind(v)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config key {key!r}: cannot read {v!r} as {kind.__name__}") from e


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder part of ``transformers.T5Config`` (defaults are transformers', i.e.
  t5-small). SD3's T5-XXL: d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads,
  gated-gelu, vocab 32128."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    if self.feed_forward_proj not in _FEED_FORWARD:
      raise ValueError(f"unsupported feed_forward_proj={self.feed_forward_proj!r}: "
                       f"supported values are {list(_FEED_FORWARD)}")
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance"):
      if getattr(self, key) <= 0:
        raise ValueError(f"T5Config: {key}={getattr(self, key)} must be positive")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config: relative_attention_num_buckets must be >= 4 "
                       f"(got {self.relative_attention_num_buckets})")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    """The activation transformers derives from ``feed_forward_proj``."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_transformers(cls, d: Mapping[str, Any]) -> "T5Config":
    """From a ``transformers.T5Config`` dict (``config.json`` of a T5 / mT5 / T5 v1.1
    folder, e.g. SD3's ``text_encoder_3``). Raises ValueError naming what is not
    supported: another ``model_type`` (UMT5, LongT5 ...), ``feed_forward_proj`` outside
    :data:`_FEED_FORWARD`, a decoder config (``is_decoder``), or saved
    ``dense_act_fn`` / ``is_gated_act`` that contradict ``feed_forward_proj``."""
    model_type = d.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
      raise ValueError(f"unsupported model_type={model_type!r}: supported values are "
                       f"{list(_MODEL_TYPES)}")
    if d.get("is_decoder"):
      raise ValueError("unsupported is_decoder=True: only the (bidirectional) T5 encoder "
                       "is implemented")
    f = cls()
    ff = d.get("feed_forward_proj", f.feed_forward_proj) or f.feed_forward_proj
    if ff not in _FEED_FORWARD:
      raise ValueError(f"unsupported feed_forward_proj={ff!r}: supported values are "
                       f"{list(_FEED_FORWARD)}")
    c = cls(
        vocab_size=_get(d, "vocab_size", f.vocab_size),
        d_model=_get(d, "d_model", d.get("hidden_size", f.d_model)),
        d_kv=_get(d, "d_kv", d.get("head_dim", f.d_kv)),
        d_ff=_get(d, "d_ff", f.d_ff),
        num_layers=_get(d, "num_layers", d.get("num_hidden_layers", f.num_layers)),
        num_heads=_get(d, "num_heads", d.get("num_attention_heads", f.num_heads)),
        relative_attention_num_buckets=_get(d, "relative_attention_num_buckets",
                                            f.relative_attention_num_buckets),
        relative_attention_max_distance=_get(d, "relative_attention_max_distance",
                                             f.relative_attention_max_distance),
        layer_norm_epsilon=_get(d, "layer_norm_epsilon", f.layer_norm_epsilon, float),
        feed_forward_proj=ff,
    )
    act = d.get("dense_act_fn")
    if act is not None and act != c.dense_act_fn:
      raise ValueError(f"unsupported dense_act_fn={act!r} with feed_forward_proj={ff!r} "
                       f"(transformers derives {c.dense_act_fn!r})")
    gated = d.get("is_gated_act")
    if gated is not None and bool(gated) != c.is_gated_act:
      raise ValueError(f"unsupported is_gated_act={gated!r} with feed_forward_proj={ff!r}")
    return c


# ----------------------------------------------------------------------------- layers


def _act(name: str, x):
  if name == "relu":
    return jax.nn.relu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return jax.nn.gelu(x, approximate=True)
  if name == "silu":
    return jax.nn.silu(x)
  raise ValueError(f"unsupported activation {name!r}: supported values are {list(_ACTS)}")


def _dense(features: int, dtype: Dtype, name: str, std: float) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(std), name=name)


def relative_position_bucket(relative_position, num_buckets: int = 32,
                             max_distance: int = 128):
  """transformers' bidirectional ``T5Attention._relative_position_bucket``: int32 buckets
  in ``[0, num_buckets)`` for ``relative_position = key_pos - query_pos``."""
  rel = jnp.asarray(relative_position, jnp.int32)
  half = num_buckets // 2
  buckets = jnp.where(rel > 0, half, 0)
  rel = jnp.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  # float32 as in torch; max(rel, 1) only avoids log(0) where the small branch is taken.
  ratio = jnp.maximum(rel, 1).astype(jnp.float32) / max_exact
  large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                       * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return buckets + jnp.where(is_small, rel, large)


class T5LayerNorm(nn.Module):
  """RMS norm (``scale``); statistics in float32, returns float32."""

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return scale * (x * jax.lax.rsqrt(var + self.epsilon))


class T5Attention(nn.Module):
  """Bidirectional self-attention; ``q`` / ``k`` / ``v`` / ``o`` without bias. With
  ``has_relative_attention_bias`` the position bias ``[1, H, L, L]`` is computed here,
  else ``position_bias`` must be given. Returns ``(output, position_bias)``."""

  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, position_bias=None):
    c = self.config
    b, length, d = x.shape
    std = (c.d_model * c.d_kv) ** -0.5
    h = x.astype(self.dtype)

    def heads(name, s):
      return _dense(c.inner_dim, self.dtype, name, s)(h).reshape(b, length, c.num_heads, c.d_kv)

    q, k, v = heads("q", std), heads("k", d ** -0.5), heads("v", d ** -0.5)
    if position_bias is None:
      if not self.has_relative_attention_bias:
        raise ValueError("T5Attention: position_bias is required in blocks after the first")
      pos = jnp.arange(length)
      buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                         c.relative_attention_num_buckets,
                                         c.relative_attention_max_distance)
      table = nn.Embed(c.relative_attention_num_buckets, c.num_heads,
                       param_dtype=jnp.float32, dtype=jnp.float32,
                       embedding_init=nn.initializers.normal(d ** -0.5),
                       name="relative_attention_bias")(buckets)  # [L, L, H]
      position_bias = jnp.transpose(table, (2, 0, 1))[None]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + position_bias
    if mask is not None:
      logits = jnp.where(mask, logits, _MASK_VALUE)
    w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, length, c.inner_dim)
    return _dense(d, self.dtype, "o", c.inner_dim ** -0.5)(out), position_bias


class T5DenseReluDense(nn.Module):
  """``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)``."""

  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x.astype(self.dtype)
    if c.is_gated_act:
      h = _act(c.dense_act_fn, _dense(c.d_ff, self.dtype, "wi_0", c.d_model ** -0.5)(x))
      h = h * _dense(c.d_ff, self.dtype, "wi_1", c.d_model ** -0.5)(x)
    else:
      h = _act(c.dense_act_fn, _dense(c.d_ff, self.dtype, "wi", c.d_model ** -0.5)(x))
    return _dense(c.d_model, self.dtype, "wo", c.d_ff ** -0.5)(h)


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, position_bias=None):
    h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
    out, position_bias = T5Attention(self.config, self.has_relative_attention_bias,
                                     self.dtype, name="SelfAttention")(h, mask, position_bias)
    return x + out.astype(jnp.float32), position_bias


class T5LayerFF(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
    return x + T5DenseReluDense(self.config, self.dtype,
                                name="DenseReluDense")(h).astype(jnp.float32)


class T5Block(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, position_bias=None):
    x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias,
                                            self.dtype, name="layer_0")(x, mask, position_bias)
    return T5LayerFF(self.config, self.dtype, name="layer_1")(x), position_bias


class T5Stack(nn.Module):
  """``block_0 .. block_{n-1}`` (the first owns the relative position bias) and
  ``final_layer_norm``; input: embeddings (float32), output float32."""

  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    position_bias = None
    for i in range(self.config.num_layers):
      x, position_bias = T5Block(self.config, i == 0, self.dtype,
                                 name=f"block_{i}")(x, mask, position_bias)
    return T5LayerNorm(self.config.layer_norm_epsilon, name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
  """``transformers.T5EncoderModel``.

  ``__call__(input_ids [B, L] int, attention_mask=None)`` -> ``last_hidden_state
  [B, L, d_model]`` float32. ``attention_mask`` (1 = real token, 0 = padding) masks
  padded *keys*, as transformers does; padded positions still get (meaningless) states.
  SD3's ``encode_prompt`` passes no mask (pads are attended to).
  """

  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask: Optional[Any] = None):
    c = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    x = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
                 embedding_init=nn.initializers.normal(1.0), name="shared")(input_ids)
    mask = None
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                         f"{input_ids.shape}")
      mask = (attention_mask != 0)[:, None, None, :]
    return T5Stack(c, self.dtype, name="encoder")(x, mask)


def param_count(config: T5Config) -> int:
  """Number of encoder parameters (``shared`` included), for sanity checks."""
  c = config
  ff = (3 if c.is_gated_act else 2) * c.d_model * c.d_ff
  block = 4 * c.d_model * c.inner_dim + ff + 2 * c.d_model
  return (c.vocab_size * c.d_model + c.num_layers * block
          + c.relative_attention_num_buckets * c.num_heads + c.d_model)
