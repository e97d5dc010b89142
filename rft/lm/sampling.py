"""KV-cached sampling from a decoder LM, with per-token log-probs.

    prefill(prompt) -> cache ;  repeat: logits -> filter (top-k, top-p) -> sample -> decode

One jitted program: the prompt batch is prefilled into a cache of P + N slots, then a
`lax.while_loop` decodes one token per iteration (updating the cache in place) and stops
early when every row has finished. Prompts are left-padded; RoPE positions count only
real tokens, so padding changes nothing.

Returned per completion token:
  tokens     sampled ids (PAD after the end)
  mask       1 for completion tokens (EOS and stop tokens included), 0 after the end
  log_probs  log softmax(logits / temperature)[token]: the log-prob under the policy the
             trainer optimises (top-k / top-p only restrict what is sampled, as in TRL
             and vLLM's "processed logits" off). Greedy decoding records temperature 1.
A row ends at EOS, at the end of a stop sequence (token ids), or after max_new_tokens
(then `truncated` is True: DAPO's overlong filtering and punishment use it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rft.models import lm

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  greedy: bool = False


class Completions(NamedTuple):
  tokens: jax.Array  # [B, N] int32
  mask: jax.Array  # [B, N] float32
  log_probs: jax.Array  # [B, N] float32
  lengths: jax.Array  # [B] int32
  truncated: jax.Array  # [B] bool


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """RoPE positions of left-padded rows: real tokens count 0, 1, 2, ...; pads get 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Keep the top_k largest logits and the smallest set with probability mass >= top_p."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p  # the first token is always kept
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, NEG)
  return logits


def _stop_hit(out: jax.Array, step: jax.Array, stops: tuple[tuple[int, ...], ...]) -> jax.Array:
  """[B] bool: the tokens out[:, step-len+1 : step+1] equal one of the stop sequences."""
  hit = jnp.zeros(out.shape[0], bool)
  for seq in stops:
    n = len(seq)
    if n > out.shape[1]:
      continue  # longer than the whole completion: can never match
    window = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - n + 1, 0), n, axis=1)
    hit |= (step + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
  return hit


@functools.partial(jax.jit, static_argnames=("config", "sampling", "eos_id", "pad_id",
                                             "stop_sequences"))
def generate(config: lm.LMConfig, params: Any, prompt_tokens: jax.Array,
             prompt_mask: jax.Array, key: jax.Array, *, sampling: SamplingConfig,
             eos_id: int, pad_id: int,
             stop_sequences: tuple[tuple[int, ...], ...] = ()) -> Completions:
  """Sample sampling.max_new_tokens tokens after each left-padded prompt row."""
  B, P = prompt_tokens.shape
  N = sampling.max_new_tokens
  prompt_mask = prompt_mask.astype(bool)
  key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, N), bool)], axis=1)
  cache = lm.init_cache(config, B, P + N, jnp.dtype(config.dtype))
  positions = positions_from_mask(prompt_mask)
  logits, cache = lm.forward(config, params, prompt_tokens, positions, key_mask, cache=cache,
                             cache_index=jnp.int32(0))
  next_pos = positions[:, -1] + 1
  temperature = 1.0 if sampling.greedy else sampling.temperature

  def pick(logits, k):
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    if sampling.greedy:
      tok = jnp.argmax(logits, axis=-1)
    else:
      tok = jax.random.categorical(
          k, filter_logits(logits / temperature, sampling.top_k, sampling.top_p), axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, gather_tokens(logp, tok)

  out = jnp.full((B, N), pad_id, jnp.int32)
  lps = jnp.zeros((B, N), jnp.float32)
  mask = jnp.zeros((B, N), jnp.float32)
  done = jnp.zeros(B, bool)
  tok, lp = pick(logits[:, -1], jax.random.fold_in(key, 0))

  def cond(carry):
    step, _, _, _, _, _, done, _, _ = carry
    return (step < N) & ~jnp.all(done)

  def body(carry):
    step, cache, tok, lp, out, lps, done, mask, pos = carry
    live = ~done
    out = out.at[:, step].set(jnp.where(live, tok, pad_id))
    lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
    mask = mask.at[:, step].set(live.astype(jnp.float32))
    done = done | (live & (tok == eos_id)) | (live & _stop_hit(out, step, stop_sequences))
    logits, cache = lm.forward(config, params, tok[:, None], pos[:, None], key_mask,
                               cache=cache, cache_index=P + step)
    tok, lp = pick(logits[:, 0], jax.random.fold_in(key, step + 1))
    return step + 1, cache, tok, lp, out, lps, done, mask, pos + 1

  carry = (jnp.int32(0), cache, tok, lp, out, lps, done, mask, next_pos)
  _, _, _, _, out, lps, done, mask, _ = jax.lax.while_loop(cond, body, carry)
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
  return Completions(out, mask, lps, lengths, ~done)


def completion_log_softmax(config: lm.LMConfig, params: Any, prompt_tokens: jax.Array,
                           prompt_mask: jax.Array, completion: jax.Array,
                           completion_mask: jax.Array, temperature: float = 1.0) -> jax.Array:
  """[B, N, vocab] log softmax(logits / temperature) at each completion position (the
  distribution each completion token was drawn from), one full forward."""
  tokens = jnp.concatenate([prompt_tokens, completion], axis=1)
  mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask > 0], axis=1)
  logits, _ = lm.forward(config, params, tokens, positions_from_mask(mask), mask)
  P = prompt_tokens.shape[1]
  return jax.nn.log_softmax(logits[:, P - 1:-1].astype(jnp.float32) / temperature, axis=-1)


def gather_tokens(logp: jax.Array, tokens: jax.Array) -> jax.Array:
  """[B, N] entries of [B, N, vocab] `logp` at `tokens`."""
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def token_log_probs(config: lm.LMConfig, params: Any, prompt_tokens: jax.Array,
                    prompt_mask: jax.Array, completion: jax.Array, completion_mask: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
  """[B, N] log softmax(logits / temperature) of each completion token, one full forward.

  This is what the trainer differentiates; on the sampler's own params it equals the
  sampler's recorded log-probs up to float rounding (different matmul shapes).
  """
  return gather_tokens(completion_log_softmax(config, params, prompt_tokens, prompt_mask,
                                              completion, completion_mask, temperature),
                       completion)


def decode_texts(tokenizer, completions: Completions) -> list[str]:
  toks = np.asarray(completions.tokens)
  mask = np.asarray(completions.mask) > 0
  return [tokenizer.decode(t[m]) for t, m in zip(toks, mask)]


def stop_sequences_from_strings(tokenizer, strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token-id stop sequences (exact for character tokenizers; for BPE tokenizers a string
  may tokenize differently in context, so also post-process texts)."""
  return tuple(tuple(int(i) for i in tokenizer.encode(s)) for s in strings if s)
