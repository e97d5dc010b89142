"""diffusers ``AutoencoderKL`` checkpoints -> :class:`rft.models.vae.AutoencoderKL` params.

* :func:`load_vae` -- a diffusers pipeline folder (``model_index.json`` + ``vae/``), a hub
  id (``io.resolve_model_dir``: cached or downloaded), or the VAE folder itself (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) -> ``(VAEConfig, module, params)``.
  ``diffusion_pytorch_model.bin`` (pickle) only with ``allow_pickle=True``.
* :func:`vae_from_diffusers` -- a torch-format state dict (numpy) -> params tree.

Conversion is a rename (``.N.`` -> ``_N``, ``weight`` -> ``kernel`` / GroupNorm
``scale``) plus a layout change (Conv2d ``[O,I,kh,kw]`` -> ``[kh,kw,I,O]``, Linear
``[out,in]`` -> ``[in,out]``)::

  encoder.down_blocks.0.resnets.1.conv1.weight    -> encoder/down_blocks_0/resnets_1/conv1/kernel
  encoder.down_blocks.0.downsamplers.0.conv.bias  -> encoder/down_blocks_0/downsamplers_0/conv/bias
  decoder.mid_block.attentions.0.group_norm.weight
                                    -> decoder/mid_block/attentions_0/group_norm/scale
  decoder.mid_block.attentions.0.to_out.0.weight  -> decoder/mid_block/attentions_0/to_out_0/kernel
  quant_conv.weight                               -> quant_conv/kernel

The mid-block attention is read in both spellings found in published files: the current
``to_q / to_k / to_v / to_out.0`` and the legacy ``query / key / value / proj_attn`` (older
SD VAE files, which diffusers renames on load), each as a Linear ``[C, C]`` or a 1x1 conv
``[C, C, 1, 1]``. Every key and shape is checked against the module
(:func:`rft.weights.io.convert_state`): a missing, unexpected or misshapen key is a
ValueError naming it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.vae import AutoencoderKL, VAEConfig
from rft.weights import io

__all__ = ["load_vae", "vae_from_diffusers", "expected_shapes", "resolve_vae_dir"]

_WEIGHTS = "diffusion_pytorch_model"
_EXPECTED_FILES = (
    "a diffusers pipeline folder (model_index.json and vae/config.json + "
    f"vae/{_WEIGHTS}.safetensors) or an AutoencoderKL folder (config.json + "
    f"{_WEIGHTS}.safetensors)")
_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out_0")


def expected_shapes(config: VAEConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our param paths -> shapes (``jax.eval_shape`` of ``AutoencoderKL.init``)."""
  s = config.downscale
  x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
  return io.eval_shapes(lambda: AutoencoderKL(config).init(jax.random.PRNGKey(0), x))


def _path_of(key: str) -> Optional[Tuple[Tuple[str, ...], bool]]:
  """torch key -> (our path, is an attention Linear), or None for a malformed key."""
  parts = key.split(".")
  if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
    return None
  mods = []
  for p in parts[:-1]:
    if p.isdigit():
      if not mods:
        return None
      mods[-1] = f"{mods[-1]}_{p}"
    else:
      mods.append(p)
  if len(mods) >= 2 and mods[-2] == "attentions_0":
    if mods[-1] in _ATTN_LEGACY:
      mods[-1] = _ATTN_LEGACY[mods[-1]]
    elif mods[-1] == "to_out":  # ``to_out.0`` was merged above unless malformed
      return None
  is_attn_linear = len(mods) >= 2 and mods[-2] == "attentions_0" and mods[-1] in _ATTN_LINEARS
  if parts[-1] == "bias":
    leaf = "bias"
  else:
    leaf = "scale" if "norm" in mods[-1] else "kernel"
  return tuple(mods) + (leaf,), is_attn_linear


def _to_torch_key(path: Tuple[str, ...]) -> str:
  """Our path -> the (current-spelling) diffusers key, for error messages."""
  out = []
  for p in path[:-1]:
    head, _, tail = p.rpartition("_")
    out.extend([head, tail] if head and tail.isdigit() else [p])
  out.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(out)


def vae_from_diffusers(state: Dict[str, np.ndarray], config: VAEConfig, *, source: str,
                       dtype=jnp.float32) -> Dict[str, Any]:
  """A diffusers ``AutoencoderKL`` state dict (numpy arrays) -> our params tree.

  Accepts legacy attention names and 1x1-conv attention weights (see the module
  docstring). Raises ValueError naming ``source`` and any unknown key, missing key or
  wrong shape.
  """
  state = dict(state)
  for key, value in state.items():  # attention weights saved as 1x1 convs -> Linear
    conv_ = _path_of(key)
    if conv_ is not None and conv_[1] and np.ndim(value) == 4 and value.shape[2:] == (1, 1):
      state[key] = np.asarray(value)[:, :, 0, 0]

  def key_fn(key):
    conv_ = _path_of(key)
    if conv_ is None:
      return None
    path, is_attn_linear = conv_
    if path[-1] != "kernel":
      return path, None
    return path, (io.linear if is_attn_linear else io.conv)

  return io.convert_state(state, key_fn, expected_shapes(config), source=source, dtype=dtype,
                          describe=_to_torch_key)


# ----------------------------------------------------------------------------- folders


def resolve_vae_dir(path: Any, *, subfolder: Optional[str] = "vae") -> str:
  """The folder holding the VAE's ``config.json``: ``path/subfolder`` when it has one,
  else ``path`` itself. ``path`` may be a hub id (cached or downloaded; a pipeline repo
  with ``model_index.json`` or a standalone VAE repo). FileNotFoundError names the paths
  tried and the files expected."""
  return io.resolve_component_dir(path, subfolder, "VAE", _EXPECTED_FILES)


def _read_weights(vae_dir: str, *, allow_pickle: bool, variant: Optional[str]):
  return io.read_component_weights(vae_dir, _WEIGHTS, allow_pickle=allow_pickle,
                                   expected=_EXPECTED_FILES, variant=variant)


def load_vae(path: Any, *, subfolder: Optional[str] = "vae", allow_pickle: bool = False,
             dtype=jnp.float32, compute_dtype=jnp.float32, variant: Optional[str] = None,
             **module_kw) -> Tuple[VAEConfig, AutoencoderKL, Dict[str, Any]]:
  """Loads a diffusers ``AutoencoderKL``: ``(VAEConfig, AutoencoderKL module, params)``.

  Args:
    path: a pipeline folder (the VAE in ``subfolder``), the VAE folder itself, or a hub
      id (cached or downloaded: ``io.resolve_model_dir``).
    subfolder: where the VAE lives inside a pipeline folder.
    allow_pickle: also read ``diffusion_pytorch_model.bin`` (``torch.load`` with
      ``weights_only=True``) when there is no safetensors file.
    dtype: the params' dtype.
    compute_dtype: the module's compute dtype (``AutoencoderKL.dtype``).
    variant: read ``diffusion_pytorch_model.{variant}.safetensors`` (e.g. "fp16").
    **module_kw: other :class:`AutoencoderKL` fields (``remat``,
      ``attention_implementation``).
  """
  vae_dir = resolve_vae_dir(path, subfolder=subfolder)
  config_path = os.path.join(vae_dir, "config.json")
  try:
    config = VAEConfig.from_diffusers(io.read_json(config_path, expected=_EXPECTED_FILES))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: {e}") from e
  state = _read_weights(vae_dir, allow_pickle=allow_pickle, variant=variant)
  params = vae_from_diffusers(state, config, source=vae_dir, dtype=dtype)
  return config, AutoencoderKL(config, dtype=compute_dtype, **module_kw), params
