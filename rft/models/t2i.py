"""The ShapesWorld text-to-image denoiser: ``TextEncoder`` + ``UNet``.

    model = TextToImage()                                   # defaults fit ShapesWorld
    params = model.init(rng, x, t, tokens)["params"]        # x [B,16,16,3], tokens [B,12]
    encode = make_encode_fn(model)                          # (params, tokens) -> cond
    eps_fn = make_eps_fn(model)                             # (params, x_t, t, cond) -> eps
    eps = eps_fn(params, x_t, t, encode(params, tokens))

``cond = {"states": [B, L, D], "mask": [B, L] bool}`` is what samplers and objectives
carry around: encode prompts once per rollout, denoise many times. For classifier-free
guidance, the empty prompt is an all-pad token row (``mask`` all False); the UNet then
sees no text at all (its cross-attention output and pooled text are exactly zero).

All fields are plain ints/tuples, so the module is hashable and can be a static arg.
``TextToImage.from_config(text=..., unet=...)`` builds one from config dicts and
rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rft.models.text_encoder import TextEncoder
from rft.models.unet import UNet

# Config-dict key -> model field, for from_config (the text keys are shared by every
# ShapesWorld text-to-image model: TextToImage here, TextToImageDiT in rft.models.dit).
TEXT_KEYS = {
    "vocab_size": "vocab_size", "max_len": "max_len", "width": "text_width",
    "depth": "text_depth", "num_heads": "text_heads", "mlp_ratio": "text_mlp_ratio",
    "pad_id": "pad_id",
}
_UNET_KEYS = {
    "channels": "channels", "num_res_blocks": "num_res_blocks",
    "attn_levels": "attn_levels", "self_attn_levels": "self_attn_levels",
    "mid_attn": "mid_attn", "full_skips": "full_skips", "num_heads": "num_heads",
    "emb_dim": "emb_dim",
    "num_groups": "num_groups", "out_channels": "out_channels", "pos_emb": "pos_emb",
}


def text_encoder(m: nn.Module) -> TextEncoder:
  """The TextEncoder of a model with the text_* fields (called in its setup)."""
  return TextEncoder(vocab_size=m.vocab_size, max_len=m.max_len, width=m.text_width,
                     depth=m.text_depth, num_heads=m.text_heads, mlp_ratio=m.text_mlp_ratio,
                     pad_id=m.pad_id)


def fields_from_sections(owner: str, sections) -> dict:
  """Model fields from config sections ((name, dict or None, key -> field map), ...); an
  unknown key is an error naming `owner`, the section and the valid keys; lists become
  tuples (the fields must be hashable)."""
  kwargs = {}
  for section, cfg, keys in sections:
    for k, v in dict(cfg or {}).items():
      if k not in keys:
        raise ValueError(f"{owner}.from_config: unknown key {section}.{k!r}; expected one of "
                         f"{sorted(keys)}")
      kwargs[keys[k]] = tuple(v) if isinstance(v, list) else v
  return kwargs


def module_config(m: nn.Module) -> dict:
  """A module's fields as a plain dict (round-trips through ``type(m)(**cfg)``)."""
  return {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
          if f.name not in ("parent", "name")}


class TextToImage(nn.Module):
  """Text encoder + text-conditioned UNet; see the module docstring."""

  family = "unet"  # recorded in base bundles (rft.pretrained.load_shapes_base); not a field

  # Text encoder.
  vocab_size: int = 64
  max_len: int = 12
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_ratio: int = 4
  pad_id: int = 0
  # UNet.
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
  pos_emb: bool = False

  def setup(self):
    self.text = text_encoder(self)
    self.unet = UNet(
        channels=tuple(self.channels), num_res_blocks=self.num_res_blocks,
        attn_levels=tuple(self.attn_levels),
        self_attn_levels=tuple(self.self_attn_levels), mid_attn=self.mid_attn,
        full_skips=self.full_skips,
        num_heads=self.num_heads, emb_dim=self.emb_dim, num_groups=self.num_groups,
        out_channels=self.out_channels, pos_emb=self.pos_emb)

  def encode(self, tokens):
    """``tokens [B, L] -> (states [B, L, text_width], mask [B, L] bool)``."""
    return self.text(tokens)

  def denoise(self, x, t, states, mask):
    """``x [B,H,W,3], t [B], states [B,L,D], mask [B,L] -> eps [B,H,W,out]``."""
    return self.unet(x, t, states, mask)

  def __call__(self, x, t, tokens):
    states, mask = self.encode(tokens)
    return self.denoise(x, t, states, mask)

  @classmethod
  def from_config(cls, text: Mapping[str, Any] | None = None,
                  unet: Mapping[str, Any] | None = None) -> "TextToImage":
    """Build from ``text`` (TextEncoder keys) and ``unet`` (UNet keys) dicts."""
    return cls(**fields_from_sections("TextToImage", (("text", text, TEXT_KEYS),
                                                      ("unet", unet, _UNET_KEYS))))

  def config(self) -> dict:
    """The fields as a plain dict (round-trips through ``TextToImage(**cfg)``)."""
    return module_config(self)


Cond = Mapping[str, jnp.ndarray]


def make_encode_fn(model: TextToImage) -> Callable[[Any, jnp.ndarray], dict]:
  """``encode(params, tokens) -> {"states": [B,L,D], "mask": [B,L]}``."""

  def encode(params, tokens):
    states, mask = model.apply({"params": params}, tokens, method="encode")
    return {"states": states, "mask": mask}

  return encode


def make_eps_fn(model: TextToImage) -> Callable[[Any, jnp.ndarray, jnp.ndarray, Cond],
                                                 jnp.ndarray]:
  """``eps_fn(params, x_t, t, cond) -> eps`` with ``cond`` from ``make_encode_fn``."""

  def eps_fn(params, x_t, t, cond):
    return model.apply({"params": params}, x_t, t, cond["states"], cond["mask"],
                       method="denoise")

  return eps_fn
