"""The LAION improved aesthetic predictor (Schuhmann, improved-aesthetic-predictor; the
reward of DDPO / AlignProp / PRDP's small-scale setting), differentiable:

    e = visual_projection(ViT-L/14(preprocess(x)))      (CLIP image embedding, 768)
    aesthetic(x) = MLP(e / |e|),  MLP = Linear(768,1024) Linear(1024,128) Linear(128,64)
                                        Linear(64,16) Linear(16,1)

with no activations (the published ``sac+logos+ava1-l14-linearMSE.pth`` is the "linear"
model; its Dropouts are identity at inference). Its state dict keys are those of torch
``nn.Sequential`` ``layers``: ``layers.{0,2,4,6,7}.{weight,bias}`` (1, 3, 5 are Dropout);
keys without the ``layers.`` prefix load too. The CLIP tower is a transformers CLIPModel
or CLIPVisionModelWithProjection folder (``openai/clip-vit-large-patch14``).

Config (``config.reward_options.aesthetic``): model_path, weights_file, allow_pickle, dtype.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rft.rewards.base import Reward, register
from rft.rewards.clip_rewards import (transform_for, as_dtype, image_reward, model_dir_for,
                                      weights_file_for)
from rft.weights import io

LAYERS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers
FEATURES = (1024, 128, 64, 16, 1)
_HOW = ("Get the CLIP ViT-L/14 with `hf download openai/clip-vit-large-patch14` (model_path) "
        "and the head sac+logos+ava1-l14-linearMSE.pth from "
        "https://github.com/christophschuhmann/improved-aesthetic-predictor (weights_file; a "
        "pickle: set --config.reward_options.aesthetic.allow_pickle=True, or convert it to "
        ".safetensors).")


class AestheticMLP(nn.Module):
  """The predictor's head: five Dense layers, no activations; [B, D] -> [B]."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, f in zip(LAYERS, FEATURES):
      x = nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32, name=f"layers_{i}")(x)
    return x[..., 0]


def _key(key: str):
  m = re.fullmatch(r"(?:layers\.)?(\d+)\.(weight|bias)", key)
  if m is None:
    return None
  path = (f"layers_{m.group(1)}", "kernel" if m.group(2) == "weight" else "bias")
  return path, io.linear if m.group(2) == "weight" else None


def load_aesthetic_head(weights_file: str, *, in_features: int = 768,
                        allow_pickle: bool = False) -> dict:
  """The head's params from a state dict file (.safetensors; .pth only with allow_pickle)."""
  state = io.read_weight_file(weights_file, allow_pickle=allow_pickle)
  expected = io.eval_shapes(lambda: AestheticMLP().init(
      jax.random.PRNGKey(0), jnp.zeros((1, in_features), jnp.float32)))
  return io.convert_state(
      state, _key, expected, source=weights_file,
      describe=lambda p: f"layers.{p[0].split('_')[1]}.{'weight' if p[1] == 'kernel' else 'bias'}")


def aesthetic_score(clip, head: AestheticMLP, params: dict, pixels):
  """[B]: head(normalised CLIP image embedding); params = {"clip": ..., "head": ...}."""
  e = clip.apply({"params": params["clip"]}, pixels, method=clip.image_features)
  e = e.astype(jnp.float32)
  e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return head.apply({"params": params["head"]}, e)


@register("aesthetic")
def aesthetic_reward(model_path: Any = "openai/clip-vit-large-patch14", weights_file: Any = None,
                     allow_pickle: bool = False, dtype: Any = jnp.float32) -> Reward:
  """LAION aesthetic score (about 1..10) of each image; prompts are not used."""
  from rft.weights.clip import load_clip_vision  # pylint: disable=import-outside-toplevel
  model_dir = model_dir_for(model_path, reward="aesthetic", key="model_path", how=_HOW,
                            expected="a transformers CLIPModel or CLIPVisionModelWithProjection"
                            " (config.json + *.safetensors)")
  path = weights_file_for(weights_file, reward="aesthetic", key="weights_file", how=_HOW)
  clip, clip_params = load_clip_vision(model_dir, allow_pickle=allow_pickle,
                                       dtype=as_dtype(dtype))
  head_params = load_aesthetic_head(path, in_features=clip.config.projection_dim,
                                    allow_pickle=allow_pickle)
  head = AestheticMLP()
  transform = transform_for([model_dir], clip.config.image_size, "aesthetic")
  return image_reward(
      "aesthetic", lambda params, pixels, _: aesthetic_score(clip, head, params, pixels),
      {"clip": clip_params, "head": head_params}, transform)
