"""diffusers ``SD3Transformer2DModel`` checkpoints -> :class:`rft.models.mmdit.SD3Transformer`.

* :func:`load_mmdit` -- a diffusers pipeline folder (``model_index.json`` +
  ``transformer/``), a hub id already in the local HF cache, or the transformer folder
  itself (``config.json`` + ``diffusion_pytorch_model.safetensors``, or the shards of
  ``diffusion_pytorch_model.safetensors.index.json`` as SD3.5-Large ships) ->
  ``(MMDiTConfig, SD3Transformer, params)``. ``diffusion_pytorch_model.bin`` (pickle) only
  with ``allow_pickle=True``; bf16 files are upcast.
* :func:`mmdit_from_diffusers` -- a torch-format state dict (numpy) -> params tree.
* :func:`save_mmdit` / :func:`mmdit_to_diffusers` -- the inverse: a params tree -> a
  diffusers ``SD3Transformer2DModel`` folder (``from_pretrained`` loads it) / state dict.

Conversion is a rename (``.N.`` -> ``_N`` for the diffusers lists ``transformer_blocks``,
``to_out`` and ``net``; ``weight`` -> ``kernel``, or ``scale`` for the q/k RMSNorms) plus
a layout change (Linear ``[out,in]`` -> ``[in,out]``, the patch Conv2d ``[O,I,p,p]`` ->
``[p,p,I,O]``)::

  pos_embed.proj.weight                            -> pos_embed/proj/kernel
  time_text_embed.timestep_embedder.linear_1.bias  -> time_text_embed/timestep_embedder/linear_1/bias
  transformer_blocks.0.attn.to_out.0.weight        -> transformer_blocks_0/attn/to_out_0/kernel
  transformer_blocks.0.attn.norm_added_q.weight    -> transformer_blocks_0/attn/norm_added_q/scale
  transformer_blocks.0.ff_context.net.0.proj.bias  -> transformer_blocks_0/ff_context/net_0/proj/bias
  norm_out.linear.weight                           -> norm_out/linear/kernel

The ``pos_embed.pos_embed`` buffer (the fixed sin-cos table, stored when
``pos_embed_max_size`` is set) is not a parameter: the module computes it. When the file
has one, it is checked against the computed table (ValueError if it differs). Every other
key and shape is checked against the module (:func:`rft.weights.io.convert_state`): a
missing, unexpected or misshapen key is a ValueError naming it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from rft.models.mmdit import (MMDiTConfig, SD3Transformer, grid_coords, sincos_1d,
                              sincos_pos_embed)
from rft.weights import io

__all__ = ["load_mmdit", "mmdit_from_diffusers", "mmdit_to_diffusers", "save_mmdit",
           "expected_shapes", "resolve_mmdit_dir"]

_WEIGHTS = "diffusion_pytorch_model"
_EXPECTED_FILES = (
    "a diffusers pipeline folder (model_index.json and transformer/config.json + "
    f"transformer/{_WEIGHTS}.safetensors) or an SD3Transformer2DModel folder (config.json + "
    f"{_WEIGHTS}.safetensors or {_WEIGHTS}.safetensors.index.json with its shards)")
_POS_EMBED_KEY = "pos_embed.pos_embed"
_POS_EMBED_TOL = 1e-5
_LISTS = ("transformer_blocks", "to_out", "net")  # diffusers nn.ModuleLists
_RMS_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
_CONV = ("pos_embed", "proj")


def expected_shapes(config: MMDiTConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our param paths -> shapes (``jax.eval_shape`` of ``SD3Transformer.init``)."""
  p = config.patch_size
  x = jnp.zeros((1, p, p, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1, 1, config.joint_attention_dim), jnp.float32)
  pooled = jnp.zeros((1, config.pooled_projection_dim), jnp.float32)
  return io.eval_shapes(
      lambda: SD3Transformer(config).init(jax.random.PRNGKey(0), x, t, y, pooled))


def _path_of(key: str) -> Optional[Tuple[str, ...]]:
  """torch key -> our path, or None for a key of no known form."""
  parts = key.split(".")
  if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
    return None
  mods = []
  for p in parts[:-1]:
    if p.isdigit():
      if not mods or mods[-1] not in _LISTS:
        return None
      mods[-1] = f"{mods[-1]}_{p}"
    else:
      mods.append(p)
  if parts[-1] == "bias":
    leaf = "bias"
  else:
    leaf = "scale" if mods[-1] in _RMS_NORMS else "kernel"
  return tuple(mods) + (leaf,)


def _to_torch_key(path: Tuple[str, ...]) -> str:
  """Our path -> the diffusers key, for error messages."""
  out = []
  for p in path[:-1]:
    head, _, tail = p.rpartition("_")
    out.extend([head, tail] if head in _LISTS and tail.isdigit() else [p])
  out.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(out)


def _check_pos_embed(table: np.ndarray, config: MMDiTConfig, source: str) -> None:
  """The checkpoint's ``pos_embed.pos_embed`` buffer against the table the module
  computes (row by row, to keep memory small for a 192×192 grid)."""
  m = config.pos_embed_max_size
  if m is None:
    raise ValueError(f"{source}: unexpected key {_POS_EMBED_KEY} (the config has "
                     "pos_embed_max_size=None, where diffusers does not store the table)")
  d = config.inner_dim
  table = np.asarray(table)
  if table.shape not in ((1, m * m, d), (m * m, d)):
    raise ValueError(f"{source}: wrong shape for {_POS_EMBED_KEY}: checkpoint has "
                     f"{tuple(table.shape)}, the model expects {(1, m * m, d)}")
  table = table.reshape(m, m, d)
  half = sincos_1d(grid_coords(m, config.base_size), d // 2)  # [m, D/2]: one axis
  worst = 0.0
  for i in range(m):  # grid row i: columns encoded in the first half, the row in the second
    worst = max(worst, float(np.max(np.abs(table[i, :, :d // 2] - half))),
                float(np.max(np.abs(table[i, :, d // 2:] - half[i]))))
  if worst > _POS_EMBED_TOL:
    raise ValueError(
        f"{source}: {_POS_EMBED_KEY} differs from the 2D sin-cos table of this config "
        f"(max abs diff {worst:.3g}; sample_size={config.sample_size}, patch_size="
        f"{config.patch_size}, pos_embed_max_size={m}); this module only computes that table")


def mmdit_from_diffusers(state: Mapping[str, np.ndarray], config: MMDiTConfig, *,
                         source: str = "state dict", dtype=jnp.float32) -> Dict[str, Any]:
  """A diffusers ``SD3Transformer2DModel`` state dict (numpy arrays) -> our params tree.

  Raises ValueError naming ``source`` and any unknown key, missing key or wrong shape,
  and when a ``pos_embed.pos_embed`` buffer differs from the computed sin-cos table.
  """
  state = dict(state)
  if _POS_EMBED_KEY in state:
    _check_pos_embed(state.pop(_POS_EMBED_KEY), config, source)

  def key_fn(key):
    path = _path_of(key)
    if path is None:
      return None
    if path[-1] != "kernel":
      return path, None
    return path, (io.conv if path[:-1] == _CONV else io.linear)

  return io.convert_state(state, key_fn, expected_shapes(config), source=source, dtype=dtype,
                          describe=_to_torch_key)


# ----------------------------------------------------------------------------- folders


def resolve_mmdit_dir(path: Any, *, subfolder: Optional[str] = "transformer") -> str:
  """The folder holding the transformer's ``config.json``: ``path/subfolder`` when it has
  one, else ``path`` itself. ``path`` may be a hub id in the local HF cache (a pipeline
  repo with ``model_index.json`` or a standalone transformer repo). FileNotFoundError
  names the paths tried and the files expected."""
  return io.resolve_component_dir(path, subfolder, "SD3 transformer", _EXPECTED_FILES)


def _read_weights(model_dir: str, *, allow_pickle: bool, variant: Optional[str]):
  return io.read_component_weights(model_dir, _WEIGHTS, allow_pickle=allow_pickle,
                                   expected=_EXPECTED_FILES, variant=variant)


def load_mmdit(path: Any, *, subfolder: Optional[str] = "transformer",
               allow_pickle: bool = False, dtype=jnp.float32, compute_dtype=jnp.float32,
               variant: Optional[str] = None,
               **module_kw) -> Tuple[MMDiTConfig, SD3Transformer, Dict[str, Any]]:
  """Loads a diffusers ``SD3Transformer2DModel``: ``(MMDiTConfig, SD3Transformer, params)``.

  Args:
    path: a pipeline folder (the transformer in ``subfolder``), the transformer folder
      itself, or a hub id in the local HF cache (no network).
    subfolder: where the transformer lives inside a pipeline folder.
    allow_pickle: also read ``diffusion_pytorch_model.bin`` (``torch.load`` with
      ``weights_only=True``) when there is no safetensors file.
    dtype: the params' dtype.
    compute_dtype: the module's compute dtype (``SD3Transformer.dtype``).
    variant: read ``diffusion_pytorch_model.{variant}.safetensors`` (e.g. "fp16").
    **module_kw: other :class:`SD3Transformer` fields (``remat``,
      ``attention_implementation``).
  """
  model_dir = resolve_mmdit_dir(path, subfolder=subfolder)
  config_path = os.path.join(model_dir, "config.json")
  try:
    config = MMDiTConfig.from_diffusers(io.read_json(config_path, expected=_EXPECTED_FILES))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: {e}") from e
  state = _read_weights(model_dir, allow_pickle=allow_pickle, variant=variant)
  params = mmdit_from_diffusers(state, config, source=model_dir, dtype=dtype)
  return config, SD3Transformer(config, dtype=compute_dtype, **module_kw), params


# ----------------------------------------------------------------------------- saving


def mmdit_to_diffusers(params, config: MMDiTConfig) -> Dict[str, np.ndarray]:
  """Our params tree -> a diffusers ``SD3Transformer2DModel`` state dict (float32 numpy,
  torch layouts), with the ``pos_embed.pos_embed`` buffer diffusers stores when
  ``pos_embed_max_size`` is set. The inverse of :func:`mmdit_from_diffusers`; the tree
  is checked against the config first (ValueError naming a missing / extra / misshapen
  param)."""
  flat = io.check_tree(params, expected_shapes(config), "mmdit_to_diffusers")
  state = {}
  for path, value in flat.items():
    w = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      w = np.transpose(w, (3, 2, 0, 1)) if path[:-1] == _CONV else w.T
    state[_to_torch_key(path)] = np.ascontiguousarray(w)
  m = config.pos_embed_max_size
  if m is not None:
    state[_POS_EMBED_KEY] = sincos_pos_embed(m, m, config.inner_dim,
                                             base_size=config.base_size)[None]
  return state


def save_mmdit(folder: Any, config: Union[MMDiTConfig, Mapping[str, Any]], params) -> str:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` into ``folder``
  (diffusers layout, float32; ``SD3Transformer2DModel.from_pretrained(folder)`` and
  :func:`load_mmdit` read it). ``config`` is an :class:`MMDiTConfig` or a diffusers config
  dict (written as given, so extra keys of the original survive). Returns the folder.

  Refuses params that do not match the config or hold NaN / Inf.
  """
  if isinstance(config, MMDiTConfig):
    cfg, d = config, config.to_diffusers()
  else:
    d = dict(config)
    cfg = MMDiTConfig.from_diffusers(d)
  state = mmdit_to_diffusers(params, cfg)
  for k, v in state.items():
    if not np.all(np.isfinite(v)):
      raise ValueError(f"save_mmdit: {k} holds NaN or Inf; not writing {folder}")
  d.setdefault("_class_name", "SD3Transformer2DModel")
  return io.save_folder(folder, d, state, f"{_WEIGHTS}.safetensors")
