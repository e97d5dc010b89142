"""A caption-conditioned image reward model for ShapesWorld, and its bundle.

    r(image, caption) = head(mean_patches(fuse(patches(image), text(caption))))

An analog of the image-text preference models of real text-to-image work (ImageReward,
HPS, PickScore: an image and its prompt in, one score out), small enough to train on a
CPU from preference pairs or ratings (rft.reward_models.shapes_data):

* text: word embeddings + learned positions, `text_depth` pre-LN transformer blocks
  (self-attention under the pad mask; rft.models.text_encoder.masked_attention);
* image: a 3x3 convolution, then `patch` x `patch` patches (a strided convolution) as
  tokens with learned positions (16x16 images, patch 4: 16 tokens);
* fusion: `depth` pre-LN blocks, each self-attention over the image tokens,
  cross-attention to the caption's tokens, an MLP;
* head: LayerNorm, the mean over image tokens, Dense-GELU-Dense to one score.

Unlike the shipped `shapes_reward` classifier (per-cell attributes read against the
caption's grammar), nothing here knows the grammar: whatever binds words to pixels is
learned from the pairs, as a real preference model learns it. Bundle `shapes_rm`
(rft.pretrained): params in `shapes_rm.msgpack`, the model config, tokenizer length,
results and command in `shapes_rm.json`, in the trainer's workdir.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rft import pretrained
from rft.models.text_encoder import masked_attention

BUNDLE = "shapes_rm"


class _Attention(nn.Module):
  """Multi-head attention of x [B, Q, W] to context [B, K, W] under mask [B, K]."""
  num_heads: int

  @nn.compact
  def __call__(self, x, context, mask):
    w = x.shape[-1]
    dh = w // self.num_heads
    q = nn.DenseGeneral((self.num_heads, dh), name="q")(x)
    k = nn.DenseGeneral((self.num_heads, dh), name="k")(context)
    v = nn.DenseGeneral((self.num_heads, dh), name="v")(context)
    return nn.DenseGeneral(w, axis=(-2, -1), name="out")(masked_attention(q, k, v, mask))


class _Block(nn.Module):
  num_heads: int
  cross: bool

  @nn.compact
  def __call__(self, x, mask, context=None, context_mask=None):
    w = x.shape[-1]
    h = nn.LayerNorm(name="ln_self")(x)
    x = x + _Attention(self.num_heads, name="self")(h, h, mask)
    if self.cross:
      h = nn.LayerNorm(name="ln_cross")(x)
      x = x + _Attention(self.num_heads, name="cross")(h, context, context_mask)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(w, name="mlp_out")(nn.gelu(nn.Dense(4 * w, name="mlp_in")(h)))
    return x + h


class CaptionImageRM(nn.Module):
  vocab_size: int
  max_len: int
  width: int = 64
  text_depth: int = 1
  depth: int = 2
  num_heads: int = 4
  patch: int = 4
  image_size: int = 16
  pad_id: int = 0

  @nn.compact
  def __call__(self, images, tokens):
    """images float [B, H, W, 3] in [-1, 1], tokens int [B, L] -> scores float32 [B]."""
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"CaptionImageRM: images {images.shape}, expected "
                       f"[B, {self.image_size}, {self.image_size}, 3]")
    if tokens.shape[1] != self.max_len:
      raise ValueError(f"CaptionImageRM: tokens {tokens.shape}, expected [B, {self.max_len}]")
    w = self.width
    mask = tokens != self.pad_id
    t = nn.Embed(self.vocab_size, w, name="embed")(tokens)
    t = t + self.param("text_pos", nn.initializers.normal(0.02), (self.max_len, w))
    for i in range(self.text_depth):
      t = _Block(self.num_heads, cross=False, name=f"text_{i}")(t, mask)
    t = nn.LayerNorm(name="text_ln")(t)
    x = nn.gelu(nn.Conv(w // 2, (3, 3), name="stem")(images.astype(jnp.float32)))
    x = nn.Conv(w, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="patchify")(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, w)
    x = x + self.param("image_pos", nn.initializers.normal(0.02), (gh * gw, w))
    ones = jnp.ones((b, gh * gw), bool)
    for i in range(self.depth):
      x = _Block(self.num_heads, cross=True, name=f"fuse_{i}")(x, ones, t, mask)
    h = nn.LayerNorm(name="out_ln")(x).mean(axis=1)
    h = nn.gelu(nn.Dense(w, name="head_in")(h))
    return nn.Dense(1, name="head_out")(h)[:, 0].astype(jnp.float32)


MODEL_KEYS = ("width", "text_depth", "depth", "num_heads", "patch")


def make_model(vocab_size: int, max_len: int, **kw) -> CaptionImageRM:
  unknown = set(kw) - set(MODEL_KEYS)
  if unknown:
    raise ValueError(f"shapes reward model: unknown option(s) {sorted(unknown)}; "
                     f"known: {list(MODEL_KEYS)}")
  return CaptionImageRM(vocab_size=vocab_size, max_len=max_len, **kw)


def init_params(model: CaptionImageRM, key) -> Any:
  return model.init(key, jnp.zeros((1, model.image_size, model.image_size, 3)),
                    jnp.zeros((1, model.max_len), jnp.int32))["params"]


def model_config(model: CaptionImageRM) -> dict:
  return {k: getattr(model, k) for k in ("vocab_size", "max_len", *MODEL_KEYS)}


@dataclasses.dataclass
class LoadedShapesRM:
  """A trained ShapesWorld reward model: `score(images, tokens)` -> [N] float32 (a jax
  function of the images, differentiable)."""
  model: CaptionImageRM
  params: Any
  meta: dict

  def score(self, images, tokens, params=None):
    return self.model.apply({"params": self.params if params is None else params},
                            images, tokens)


def load(directory: str) -> LoadedShapesRM:
  """The `shapes_rm` bundle in `directory` (the trainer's workdir or an export folder);
  a missing bundle is an error naming the files looked for."""
  meta = pretrained.load_meta(BUNDLE, directory)
  model = CaptionImageRM(**meta["model"])
  template = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  params, _ = pretrained.load_bundle(BUNDLE, template, directory)
  return LoadedShapesRM(model, jax.tree.map(np.asarray, params), meta)
