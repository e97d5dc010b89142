"""CLIP image preprocessing in JAX, differentiable (the CLIPImageProcessor / open_clip
validation transform without PIL):

    x in [-1, 1] -> u = (x + 1) / 2 -> resize (shortest side to `size`, bicubic with
    antialias) -> center crop `crop` -> (u - mean) / std

As transformers' CLIPImageProcessor: the long side becomes int(size * long / short), the
crop starts at ((H - h) // 2, (W - w) // 2), and an image whose shortest side already is
`size` is not resampled. Resampling is ``jax.image.resize`` (Keys cubic, a = -0.5, with
antialias when downsampling), which matches PIL's bicubic up to PIL's uint8 rounding
between its two passes (see tests/test_image_rewards.py for the measured error).
Defaults are OpenAI CLIP's (224, mean (0.48145466, 0.4578275, 0.40821073), std
(0.26862954, 0.26130258, 0.27577711)); a model folder's ``preprocessor_config.json``
overrides them (:meth:`ImageTransform.from_model_dir`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from rft.weights.io import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes (as in preprocessor_config.json "resample") -> jax.image.resize method.
_RESAMPLE = {2: "linear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  size: int = 224  # shortest side after the resize
  crop: tuple[int, int] = (224, 224)  # (height, width) of the center crop
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  method: str = "bicubic"  # jax.image.resize method
  do_resize: bool = True
  do_center_crop: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], *, source: str = "preprocessor config"
                  ) -> "ImageTransform":
    """From a transformers ``preprocessor_config.json`` dict (``size``: int or
    {"shortest_edge"}; ``crop_size``: int or {"height", "width"}; ``image_mean``,
    ``image_std``, ``resample``, ``do_resize``, ``do_center_crop``). Keys it does not set
    keep the OpenAI CLIP defaults; an unsupported value is a ValueError naming it."""
    size = cfg.get("size", 224)
    if isinstance(size, Mapping):
      if "shortest_edge" not in size or len(size) != 1:
        raise ValueError(f"{source}: unsupported size={dict(size)}; expected an int or "
                         "{'shortest_edge': n}")
      size = size["shortest_edge"]
    crop = cfg.get("crop_size", 224)
    if isinstance(crop, Mapping):
      if set(crop) != {"height", "width"}:
        raise ValueError(f"{source}: unsupported crop_size={dict(crop)}; expected an int or "
                         "{'height': h, 'width': w}")
      crop = (crop["height"], crop["width"])
    elif isinstance(crop, int):
      crop = (crop, crop)
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
      raise ValueError(f"{source}: unsupported resample={resample!r}; supported: "
                       f"{sorted(_RESAMPLE)} (2 bilinear, 3 bicubic)")
    if cfg.get("do_rescale", True) is False or cfg.get("do_normalize", True) is False:
      raise ValueError(f"{source}: do_rescale=False / do_normalize=False are not supported")
    mean = tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
      raise ValueError(f"{source}: image_mean / image_std must have 3 values, got {mean}, {std}")
    return cls(size=int(size), crop=(int(crop[0]), int(crop[1])), mean=mean, std=std,
               method=_RESAMPLE[resample], do_resize=bool(cfg.get("do_resize", True)),
               do_center_crop=bool(cfg.get("do_center_crop", True)))

  @classmethod
  def from_model_dir(cls, model_dir: str | None, default: "ImageTransform | None" = None
                     ) -> "ImageTransform":
    """The folder's ``preprocessor_config.json`` when it has one, else ``default`` (or the
    OpenAI CLIP transform)."""
    if model_dir is not None:
      path = os.path.join(model_dir, "preprocessor_config.json")
      if os.path.isfile(path):
        return cls.from_config(read_json(path), source=path)
    return default if default is not None else cls()

  def resized_shape(self, height: int, width: int) -> tuple[int, int]:
    """(H, W) after the shortest-side resize, as transformers computes it."""
    if not self.do_resize:
      return height, width
    if width <= height:
      return int(self.size * height / width), self.size
    return self.size, int(self.size * width / height)

  def __call__(self, images):
    return preprocess(images, self)


def preprocess(images, transform: ImageTransform = ImageTransform()):
  """images [B, H, W, 3] in [-1, 1] -> normalised pixels [B, h, w, 3] float32."""
  x = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {x.shape}")
  b, h, w, c = x.shape
  nh, nw = transform.resized_shape(h, w)
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), method=transform.method, antialias=True)
  if transform.do_center_crop:
    ch, cw = transform.crop
    if ch > nh or cw > nw:
      raise ValueError(f"center crop {transform.crop} is larger than the resized image "
                       f"{(nh, nw)} (from {(h, w)})")
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[:, top:top + ch, left:left + cw]
  mean = jnp.asarray(transform.mean, jnp.float32)
  std = jnp.asarray(transform.std, jnp.float32)
  return (x - mean) / std
