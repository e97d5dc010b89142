"""A scalar reward head on a decoder LM (rft.models.lm), and the reward-model bundle.

    r(prompt, response) = w · pool(h(BOS prompt response EOS)) + b

h is the LM's last hidden state (after the final RMSNorm), the same decoder as
rft.models.lm.DecoderLM without its vocabulary projection; `pool` is "last" (the EOS
position: sequences are left-padded, so it is the last column) or "mean" (over the
sequence's tokens). Params are {"lm": <DecoderLM params without lm_head>, "head":
{"kernel" [hidden, 1], "bias" [1]}}: a base LM's params (e.g. the shipped arithmetic
base, rft/assets/arith_base) initialise "lm" as they are.

A trained reward model is saved as a bundle (rft.pretrained): `reward_model.msgpack`
(params) beside `reward_model.json` (the LM config, pooling, tokenizer, max_len, the
measured results, the command), in the trainer's workdir.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rft import pretrained
from rft.models import lm

BUNDLE = "reward_model"
POOLINGS = ("last", "mean")


class LMBackbone(nn.Module):
  """DecoderLM's forward without the vocabulary projection: hidden states [B, L, H]
  (same parameter names: embed_tokens, layers_i, norm)."""

  config: lm.LMConfig

  @nn.compact
  def __call__(self, tokens, mask):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    l = tokens.shape[1]
    causal = jnp.arange(l)[None, :] <= jnp.arange(l)[:, None]
    attn_mask = causal[None] & mask.astype(bool)[:, None, :]
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                 embedding_init=lm._init, name="embed_tokens")(tokens)  # pylint: disable=protected-access
    cos, sin = lm._rope_tables(c, positions, dtype)  # pylint: disable=protected-access
    for i in range(c.num_layers):
      x, _ = lm.DecoderLayer(c, i, name=f"layers_{i}")(x, cos, sin, attn_mask)
    return lm.RMSNorm(c.rms_norm_eps, name="norm")(x).astype(jnp.float32)


class RewardLM(nn.Module):
  """Scalar reward [B] of left-padded token rows (see the module docstring)."""

  config: lm.LMConfig
  pooling: str = "last"

  @nn.compact
  def __call__(self, tokens, mask):
    if self.pooling not in POOLINGS:
      raise ValueError(f"reward-model pooling {self.pooling!r}; use one of {POOLINGS}")
    h = LMBackbone(self.config, name="lm")(tokens, mask)
    if self.pooling == "last":
      pooled = h[:, -1]
    else:
      m = mask.astype(jnp.float32)[..., None]
      pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    head = nn.Dense(1, kernel_init=nn.initializers.normal(1e-2), name="head")
    return head(pooled)[..., 0]


def init_params(config: lm.LMConfig, pooling: str, key, base_params: Any = None):
  """Fresh params of a RewardLM; with `base_params` (a DecoderLM's params) the LM part is
  those (an untied lm_head is dropped), checked key by key and shape by shape."""
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = RewardLM(config, pooling).init(key, dummy, jnp.ones((1, 4), bool))["params"]
  params = jax.tree.map(np.asarray, params)
  if base_params is not None:
    from rft import checkpoint  # pylint: disable=g-import-not-at-top
    base = {k: v for k, v in dict(base_params).items() if k != "lm_head"}
    checkpoint.check_tree_matches(params["lm"], base, what="reward-model base LM params")
    params = dict(params, lm=base)
  return params


def scores(config: lm.LMConfig, pooling: str, params, tokens, mask):
  """RewardLM(config, pooling).apply: rewards [B] float32."""
  return RewardLM(config, pooling).apply({"params": params}, tokens, mask)


@dataclasses.dataclass
class LoadedRewardModel:
  """A reward model loaded from a bundle: `score(prompts, responses)` -> [N] float32."""
  lm_config: lm.LMConfig
  pooling: str
  params: Any
  tokenizer: Any
  max_len: int
  meta: dict
  batch_size: int = 256

  def __post_init__(self):
    self._fn = jax.jit(lambda p, t, m: scores(self.lm_config, self.pooling, p, t, m))

  def score(self, prompts, responses, where=None) -> np.ndarray:
    from rft.reward_models import data  # pylint: disable=g-import-not-at-top
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = []
    for s in range(0, len(prompts), self.batch_size):
      t, m = data.encode(self.tokenizer, prompts[s:s + self.batch_size],
                         responses[s:s + self.batch_size], self.max_len,
                         None if where is None else where[s:s + self.batch_size])
      n = len(t)
      pad = (-n) % 8  # a few batch shapes only: fewer compilations
      if pad:
        t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
        m = np.concatenate([m, np.repeat(m[-1:], pad, 0)])
      out.append(np.asarray(self._fn(self.params, t, m))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def meta_for(lm_config: lm.LMConfig, pooling: str, max_len: int, tokenizer: str = "arith_char",
             **extra) -> dict:
  return {"model": dataclasses.asdict(lm_config), "pooling": pooling, "max_len": max_len,
          "tokenizer": tokenizer, **extra}


def make_tokenizer(name: str):
  if name == "arith_char":
    from rft.data.arithmetic import CharTokenizer  # pylint: disable=g-import-not-at-top
    return CharTokenizer()
  raise ValueError(f"reward-model bundle tokenizer {name!r} is not known; known: "
                   f"['arith_char']")


def load(directory: str) -> LoadedRewardModel:
  """The reward model bundle in `directory` (a trainer's workdir or an export folder);
  a missing bundle is an error naming the files looked for."""
  meta = pretrained.load_meta(BUNDLE, directory)
  cfg = lm.LMConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in meta["model"].items()})
  pooling = meta["pooling"]
  dummy = jnp.zeros((1, 4), jnp.int32)
  template = jax.eval_shape(RewardLM(cfg, pooling).init, jax.random.key(0), dummy,
                            jnp.ones((1, 4), bool))["params"]
  params, _ = pretrained.load_bundle(BUNDLE, template, directory)
  return LoadedRewardModel(cfg, pooling, params, make_tokenizer(meta["tokenizer"]),
                           int(meta["max_len"]), meta)
