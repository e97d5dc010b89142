"""A decoder-only LM of the Llama / Qwen2 / Qwen3 family, with a KV cache.

One module covers the three architectures; they differ only in a few switches of
:class:`LMConfig`:

* Llama: no biases (or ``attention_bias``: q/k/v *and* o biases), optional
  ``rope_scaling`` ("linear", "dynamic", "llama3").
* Qwen2: q/k/v biases, no o bias (``attention_bias=True, o_proj_bias=False``).
* Qwen3: RMSNorm over ``head_dim`` on q and k before RoPE (``qk_norm``), explicit
  ``head_dim`` (may differ from ``hidden_size // num_heads``).

Parameter names mirror the Hugging Face (torch) module names, so a checkpoint converts by
renaming and transposing Linear weights (``rft.weights.hf_lm``)::

  embed_tokens/embedding                          [vocab, hidden]
  layers_{i}/input_layernorm/scale                [hidden]
  layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}
  layers_{i}/self_attn/{q_norm,k_norm}/scale      [head_dim]        (qk_norm only)
  layers_{i}/post_attention_layernorm/scale       [hidden]
  layers_{i}/mlp/{gate,up,down}_proj/kernel
  norm/scale                                      [hidden]
  lm_head/kernel                                  [hidden, vocab]   (absent when tied)

Call convention (``DecoderLM.__call__(tokens, positions, key_mask, cache, cache_index)``):

* ``positions [B, L]`` are the RoPE positions, given per row, so a left-padded row's
  real tokens start at position 0 (``positions = cumsum(mask) - 1``).
* ``key_mask [B, S]`` marks the key slots that may be attended: ``S = L`` without a
  cache, ``S = max_len`` with one (then it must also mark the slots being written).
* Without a cache, attention is causal over the ``L`` tokens (by index). With a cache
  (:func:`init_cache`), the new k/v go to slots ``[cache_index, cache_index + L)`` and
  query ``i`` attends to slot ``s`` iff ``s <= cache_index + i`` and ``key_mask[b, s]``.
* Masked scores use a large finite negative value, so fully masked query rows (pads)
  give finite (uniform-attention) outputs, never NaN.

Numerics follow ``transformers``: RMSNorm in float32, RoPE tables in float32, softmax in
float32; logits come back float32. Params are float32; ``LMConfig.dtype`` is the
compute dtype. Checked against ``transformers`` to <= 1e-4 in ``tests/test_lm_model.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LMConfig",
    "DecoderLM",
    "init_cache",
    "forward",
    "rope_inv_freq",
]

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Required keys of each rope type (besides rope_type), and the optional ones.
_ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
}
# transformers' per-model defaults for keys a config.json may leave out.
_HF_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, head_dim=None, num_key_value_heads=None),
    "qwen2": dict(max_position_embeddings=32768, head_dim=None, num_key_value_heads=32),
    "qwen3": dict(max_position_embeddings=32768, head_dim=128, num_key_value_heads=32),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Architecture of a :class:`DecoderLM` (hashable: usable as a jit static arg).

  ``rope_scaling`` is None (plain RoPE) or a tuple of ``(key, value)`` pairs holding
  ``rope_type`` ("linear", "dynamic" or "llama3") and that type's parameters, named as in
  ``transformers`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
  ``original_max_position_embeddings``). ``o_proj_bias`` is None to follow
  ``attention_bias`` (Llama, Qwen3); Qwen2 sets it False.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  o_proj_bias: Optional[bool] = None
  qk_norm: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads"):
      v = getattr(self, name)
      if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LMConfig.{name} must be a positive int, got {v!r}")
      object.__setattr__(self, name, int(v))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LMConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"LMConfig: hidden_size ({self.hidden_size}) is not a multiple of num_heads "
            f"({self.num_heads}); give head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"LMConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.o_proj_bias is None:
      object.__setattr__(self, "o_proj_bias", bool(self.attention_bias))
    if self.rope_scaling is not None:
      items = (self.rope_scaling.items() if isinstance(self.rope_scaling, Mapping)
               else self.rope_scaling)
      params = {str(k): v for k, v in items}
      if "type" in params:  # transformers' legacy spelling
        params.setdefault("rope_type", params.pop("type"))
      object.__setattr__(self, "rope_scaling", tuple(sorted(params.items())))
      rope_type = params.get("rope_type")
      if rope_type not in _ROPE_KEYS:
        raise ValueError(
            f"LMConfig.rope_scaling: unsupported rope_type {rope_type!r}; supported: "
            f"{sorted(_ROPE_KEYS)} (given {dict(self.rope_scaling)})")
      required, optional = _ROPE_KEYS[rope_type]
      missing = [k for k in required if k not in params]
      extra = sorted(set(params) - set(required) - set(optional) - {"rope_type"})
      if missing or extra:
        raise ValueError(
            f"LMConfig.rope_scaling for rope_type {rope_type!r}: missing keys {missing}, "
            f"unexpected keys {extra}; expected {list(required)}")
      if rope_type == "default":
        object.__setattr__(self, "rope_scaling", None)
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def rope_params(self) -> Dict[str, Any]:
    """``rope_scaling`` as a dict (``{"rope_type": "default"}`` when None)."""
    if self.rope_scaling is None:
      return {"rope_type": "default"}
    return dict(self.rope_scaling)

  @property
  def model_type(self) -> str:
    """The HF ``model_type`` this architecture is written as (see :meth:`to_hf`)."""
    if self.qk_norm:
      return "qwen3"
    if self.attention_bias and not self.o_proj_bias:
      return "qwen2"
    return "llama"

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], *, dtype: str = "float32") -> "LMConfig":
    """Builds the config from a Hugging Face ``config.json`` dict.

    Reads both the transformers 5 spelling (``rope_parameters`` holding ``rope_type``
    and ``rope_theta``) and the older one (top-level ``rope_theta`` plus
    ``rope_scaling`` with ``type`` or ``rope_type``). Missing optional keys take the
    defaults transformers uses for that ``model_type``.
    """
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(
          f"LMConfig.from_hf: unsupported model_type {model_type!r}; supported: "
          f"{list(_MODEL_TYPES)}")
    defaults = _HF_DEFAULTS[model_type]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if d.get(k) is None]
    if missing:
      raise ValueError(f"LMConfig.from_hf ({model_type}): config is missing {missing}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"LMConfig.from_hf: hidden_act {act!r} unsupported (only 'silu')")
    if d.get("mlp_bias"):
      raise ValueError("LMConfig.from_hf: mlp_bias=True is not supported")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
      n = d["num_hidden_layers"]
      layer_types = d.get("layer_types") or [
          "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
          for i in range(n)]
      if d.get("sliding_window") is not None and "sliding_attention" in layer_types:
        raise ValueError(
            f"LMConfig.from_hf ({model_type}): sliding-window attention "
            f"(use_sliding_window=True, sliding_window={d.get('sliding_window')}) is not "
            "supported")

    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads", defaults["num_key_value_heads"])
    if kv_heads is None:
      kv_heads = heads
    head_dim = d.get("head_dim", defaults["head_dim"])
    max_pos = d.get("max_position_embeddings", defaults["max_position_embeddings"])

    # RoPE: transformers 5 writes rope_parameters (with rope_theta inside); older
    # files have rope_theta at the top level and rope_scaling (None for plain RoPE).
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
      raise ValueError(f"LMConfig.from_hf: rope parameters must be a dict, got {rope!r}")
    rope = dict(rope)
    if any(isinstance(v, Mapping) for v in rope.values()):
      raise ValueError(f"LMConfig.from_hf: per-layer rope parameters unsupported: {rope}")
    theta = rope.pop("rope_theta", None)
    if theta is None:
      theta = d.get("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    prf = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1.0):
      raise ValueError(f"LMConfig.from_hf: partial_rotary_factor={prf} unsupported")
    if rope_type == "llama3":
      rope.setdefault("original_max_position_embeddings", max_pos)
    # Keep only the keys this rope type reads (transformers ignores the others too).
    if rope_type in _ROPE_KEYS:
      req, opt = _ROPE_KEYS[rope_type]
      rope = {k: v for k, v in rope.items() if k in req + opt}
    rope_scaling = None if rope_type == "default" else tuple(
        sorted({"rope_type": rope_type, **rope}.items()))

    attention_bias = bool(d.get("attention_bias", False))
    o_proj_bias = attention_bias
    if model_type == "qwen2":
      attention_bias, o_proj_bias = True, False
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        qk_norm=model_type == "qwen3",
        dtype=dtype,
    )

  def to_hf(self) -> Dict[str, Any]:
    """A ``config.json`` dict that transformers (4.x and 5.x) loads as this model.

    The model type is Qwen3 when ``qk_norm``, Qwen2 for q/k/v-but-not-o biases, Llama
    otherwise. Raises ValueError for combinations no HF model type has.
    """
    model_type = self.model_type
    if model_type == "qwen3" and self.attention_bias != self.o_proj_bias:
      raise ValueError("LMConfig.to_hf: qk_norm with q/k/v bias but no o bias has no HF "
                       "model type")
    if model_type == "llama" and self.o_proj_bias and not self.attention_bias:
      raise ValueError("LMConfig.to_hf: an o_proj bias without q/k/v biases has no HF "
                       "model type")
    rope = self.rope_params
    d = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "rope_theta": self.rope_theta,
        # Older transformers read rope_scaling; transformers 5 reads either.
        "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
        "rope_parameters": {**rope, "rope_theta": self.rope_theta},
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if model_type != "qwen2":
      d["attention_bias"] = self.attention_bias
    if model_type in ("qwen2", "qwen3"):
      d["use_sliding_window"] = False
    return d


def rope_inv_freq(config: LMConfig, positions=None):
  """RoPE inverse frequencies ``[head_dim // 2]`` (float32), as transformers computes them.

  ``positions`` is only read by the "dynamic" type (NTK scaling by the longest sequence:
  ``max(positions) + 1``, never less than ``max_position_embeddings``; this is
  transformers' behaviour for a model whose positions only grow, as in generation).
  """
  dim = config.head_dim
  base = jnp.float32(config.rope_theta)
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)
  p = config.rope_params
  rope_type = p["rope_type"]
  if rope_type == "dynamic":
    if positions is None:
      raise ValueError("rope_inv_freq: the 'dynamic' rope type needs positions")
    mpe = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, mpe)
    factor = jnp.float32(p["factor"])
    base = base * ((factor * seq_len.astype(jnp.float32) / jnp.float32(mpe))
                   - (factor - 1.0)) ** jnp.float32(dim / (dim - 2))
  inv_freq = 1.0 / (base ** exponent)
  if rope_type == "linear":
    inv_freq = inv_freq / jnp.float32(p["factor"])
  elif rope_type == "llama3":
    factor = jnp.float32(p["factor"])
    low = float(p["low_freq_factor"])
    high = float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = jnp.float32(2 * math.pi) / inv_freq
    inv_freq_llama = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (jnp.float32(old_len) / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = jnp.where(is_medium, smoothed, inv_freq_llama)
  return inv_freq.astype(jnp.float32)


def _rope_tables(config: LMConfig, positions, dtype):
  """``cos, sin [B, L, 1, head_dim]`` for ``positions [B, L]``."""
  inv_freq = rope_inv_freq(config, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  # attention_scaling is 1.0 for every supported rope type.
  return (jnp.cos(emb).astype(dtype)[:, :, None, :],
          jnp.sin(emb).astype(dtype)[:, :, None, :])


def _apply_rope(x, cos, sin):
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def init_cache(config: LMConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache: ``{"k": (...), "v": (...)}``, one ``[batch, kv_heads, max_len,
  head_dim]`` array per layer.

  Per-layer arrays (not one stacked array) so a decode step updates each in place and
  attends to it directly; slots on the second-to-last axis so the attention dots need no
  transpose. Measured on W3 (benchmarks/lm_sampling.py, CPU): a stacked
  [layers, B, S, KV, D] cache made each decoded token cost 2x the no-cache forward.
  """
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  return {n: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
          for n in ("k", "v")}


_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x**2) + eps) * scale``, statistics in float32 (as transformers)."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def _dense(features, use_bias, dtype, name):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_init, name=name)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optional q/k RMSNorm, optional KV cache."""

  config: LMConfig
  layer: int = 0  # this layer's index in the cache

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    """``x [B, L, hidden]``; ``mask [B, L, S]`` bool; ``cache`` None or the whole
    :func:`init_cache` dict. Returns ``(out [B, L, hidden], updated cache or None)``."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, l, _ = x.shape
    h, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
    q = _dense(h * d, c.attention_bias, dtype, "q_proj")(x).reshape(b, l, h, d)
    k = _dense(kvh * d, c.attention_bias, dtype, "k_proj")(x).reshape(b, l, kvh, d)
    v = _dense(kvh * d, c.attention_bias, dtype, "v_proj")(x).reshape(b, l, kvh, d)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    if cache is not None:
      # Write the new chunk into this layer's [B, KV, S, D] arrays (in place under jit:
      # a while-loop carry or a donated argument), then attend over all its slots.
      start = (0, 0, cache_index, 0)
      i = self.layer
      ck = jax.lax.dynamic_update_slice(
          cache["k"][i], k.swapaxes(1, 2).astype(cache["k"][i].dtype), start)  # [B, KV, S, D]
      cv = jax.lax.dynamic_update_slice(
          cache["v"][i], v.swapaxes(1, 2).astype(cache["v"][i].dtype), start)
      cache = {"k": cache["k"][:i] + (ck,) + cache["k"][i + 1:],
               "v": cache["v"][:i] + (cv,) + cache["v"][i + 1:]}
      k, v = ck.astype(dtype), cv.astype(dtype)
    else:
      k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, KV, L, D]
    # GQA: query head j uses kv head j // (h // kvh) (transformers' repeat_kv), done
    # by grouping the query heads instead of materialising repeated k/v.
    rep = h // kvh
    qg = q.reshape(b, l, kvh, rep, d)
    if l == 1:
      # One query per row (decoding): a fused multiply-reduce. As a dot this is b*kvh
      # tiny batched matmuls, which XLA:CPU runs ~10x slower than the arithmetic needs.
      scores = jnp.sum(qg[:, 0, :, :, None, :].astype(jnp.float32)
                       * k[:, :, None, :, :].astype(jnp.float32), axis=-1)[:, :, :, None, :]
    else:
      scores = jnp.einsum("blgrd,bgsd->bgrls", qg, k).astype(jnp.float32)
    scores = scores * jnp.float32(d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if l == 1:
      out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None, :, :], axis=3)  # [b, g, r, d]
      out = out.reshape(b, 1, h * d)
    else:
      out = jnp.einsum("bgrls,bgsd->blgrd", probs, v).reshape(b, l, h * d)
    # The barrier keeps XLA:CPU from fusing the attention output into the o_proj dot's
    # operand (measured on W3 decode: 8.9 -> 7.8 ms per step at 128 cache slots).
    out = _dense(c.hidden_size, c.o_proj_bias, dtype, "o_proj")(jax.lax.optimization_barrier(out))
    return out, cache


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LMConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    gate = _dense(c.intermediate_size, False, dtype, "gate_proj")(x)
    up = _dense(c.intermediate_size, False, dtype, "up_proj")(x)
    return _dense(c.hidden_size, False, dtype, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  config: LMConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    c = self.config
    a, cache = Attention(c, self.layer, name="self_attn")(
        RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), cos, sin, mask,
        cache, cache_index)
    x = x + a
    x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
    return x, cache


class DecoderLM(nn.Module):
  """Llama / Qwen2 / Qwen3 causal LM. See the module docstring for the call convention."""

  config: LMConfig

  @nn.compact
  def __call__(self, tokens, positions, key_mask, cache=None, cache_index=None):
    """Returns ``(logits float32 [B, L, vocab], new cache or None)``.

    Args:
      tokens: int ``[B, L]``.
      positions: int ``[B, L]`` RoPE positions.
      key_mask: bool ``[B, S]``: attendable key slots (``S = L`` without a cache,
        ``S = max_len`` of the cache with one).
      cache: None, or :func:`init_cache`'s dict; the new k/v are written at
        ``[cache_index, cache_index + L)``.
      cache_index: int32 scalar (may be traced), required with a cache.
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if tokens.ndim != 2:
      raise ValueError(f"DecoderLM: tokens must be [B, L], got shape {tokens.shape}")
    b, l = tokens.shape
    if positions.shape != (b, l):
      raise ValueError(
          f"DecoderLM: positions shape {positions.shape} != tokens shape {(b, l)}")
    if cache is None:
      s = l
      qi = jnp.arange(l)[:, None]
      causal = jnp.arange(s)[None, :] <= qi  # [L, S]
    else:
      if cache_index is None:
        raise ValueError("DecoderLM: cache_index is required when a cache is given")
      s = cache["k"][0].shape[2] if len(cache["k"]) else 0
      expected = (b, c.num_kv_heads, s, c.head_dim)
      for name in ("k", "v"):
        got = [tuple(a.shape) for a in cache[name]]
        if len(got) != c.num_layers or any(g != expected for g in got):
          raise ValueError(
              f"DecoderLM: cache[{name!r}] holds shapes {got}, expected {c.num_layers} "
              f"arrays of {expected} (batch, num_kv_heads, max_len, head_dim)")
      if l > s:
        raise ValueError(f"DecoderLM: {l} new tokens do not fit a cache of max_len {s}")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      qi = cache_index + jnp.arange(l)[:, None]
      causal = jnp.arange(s)[None, :] <= qi
    if key_mask.shape != (b, s):
      raise ValueError(
          f"DecoderLM: key_mask shape {key_mask.shape}, expected {(b, s)} "
          f"({'cache max_len' if cache is not None else 'tokens length'} keys)")
    mask = causal[None, :, :] & key_mask.astype(bool)[:, None, :]  # [B, L, S]

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=_init, name="embed_tokens")
    x = embed(tokens)
    cos, sin = _rope_tables(c, positions, dtype)
    if cache is not None:
      cache = {"k": tuple(cache["k"]), "v": tuple(cache["v"])}
    for i in range(c.num_layers):
      x, cache = DecoderLayer(c, i, name=f"layers_{i}")(x, cos, sin, mask, cache,
                                                          cache_index)
    x = RMSNorm(c.rms_norm_eps, name="norm")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c.vocab_size, False, dtype, "lm_head")(x)
    return logits.astype(jnp.float32), cache


def forward(config: LMConfig, params, tokens, positions, key_mask, cache=None,
            cache_index=None):
  """``DecoderLM(config).apply({"params": params}, ...)``: ``(logits, cache)``."""
  return DecoderLM(config).apply({"params": params}, tokens, positions, key_mask,
                                 cache, cache_index)
