"""diffusers ``UNet2DConditionModel`` checkpoints <-> :class:`rft.models.sd_unet.UNet2DCondition`.

* :func:`load_unet` -- a diffusers pipeline folder (``model_index.json`` + ``unet/``), a
  hub id in the local HF cache, or the ``unet`` folder itself: ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` (or sharded with
  ``diffusion_pytorch_model.safetensors.index.json``); the pickle
  ``diffusion_pytorch_model.bin`` only with ``allow_pickle=True``.
* :func:`unet_from_diffusers` / :func:`unet_to_diffusers` -- state dict <-> params.
* :func:`save_unet` -- writes a folder that ``UNet2DConditionModel.from_pretrained`` and
  :func:`load_unet` read (e.g. a finetuned UNet put back into a pipeline folder).

Conversion is a rename (an index joins its module name: ``down_blocks.0.resnets.1`` ->
``down_blocks_0/resnets_1``) plus layouts: Conv2d ``[O, I, kh, kw]`` -> ``[kh, kw, I,
O]`` (:func:`io.conv`), Linear ``[out, in]`` -> ``[in, out]`` (:func:`io.linear`),
norm ``weight`` -> ``scale``::

  conv_in.weight                                         -> conv_in/kernel (conv)
  time_embedding.linear_1.weight                         -> time_embedding/linear_1/kernel (T)
  down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight
                      -> down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel (T)
  ....transformer_blocks.0.ff.net.0.proj.weight          -> .../ff/net_0/proj/kernel (T)
  ....attn2.to_out.0.bias                                -> .../attn2/to_out_0/bias
  mid_block.resnets.0.norm1.weight                       -> mid_block/resnets_0/norm1/scale

Every key and shape is checked against ``jax.eval_shape`` of the module's init.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from rft import paths
from rft.models.sd_unet import UNet2DCondition, UNetConfig
from rft.weights import io

__all__ = ["unet_from_diffusers", "unet_to_diffusers", "load_unet", "save_unet",
           "expected_shapes"]

WEIGHTS_NAME = "diffusion_pytorch_model"
_EXPECTED_FILES = (f"unet/config.json and unet/{WEIGHTS_NAME}.safetensors (or "
                   f"{WEIGHTS_NAME}.safetensors.index.json with its shards; "
                   f"{WEIGHTS_NAME}.bin only with allow_pickle=True)")
_INDEXED = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
            "downsamplers", "upsamplers", "to_out", "net")
_INDEXED_RE = re.compile(r"^(" + "|".join(_INDEXED) + r")_(\d+)$")


def expected_shapes(config: UNetConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our param paths -> shapes (``jax.eval_shape`` of the init; nothing allocated)."""
  return dict(_expected_shapes(config))


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: UNetConfig):
  module = UNet2DCondition(config)

  def init():
    hw = max(8, 2 ** (config.num_levels - 1))
    x = jnp.zeros((1, hw, hw, config.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 4, config.cross_dims[0]), jnp.float32)
    return module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), ctx)

  return io.eval_shapes(init)


def _module_path(key: str) -> Optional[Tuple[str, ...]]:
  """``a.b.0.c.weight`` -> ``("a", "b_0", "c")`` and the leaf name, or None."""
  parts = key.split(".")
  out = []
  for p in parts[:-1]:
    if p.isdigit():
      if not out:
        return None
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out) + (parts[-1],)


def _key_fn(expected):
  def key_fn(key):
    path = _module_path(key)
    if path is None:
      return None
    mod, leaf = path[:-1], path[-1]
    if leaf == "bias":
      return mod + ("bias",), None
    if leaf != "weight":
      return None
    if mod + ("scale",) in expected:
      return mod + ("scale",), None
    kernel = mod + ("kernel",)
    if kernel in expected:
      return kernel, io.conv if len(expected[kernel]) == 4 else io.linear
    return None
  return key_fn


def _to_key(path: Tuple[str, ...]) -> str:
  """Our param path -> torch key (inverse of the rename)."""
  parts = []
  for p in path[:-1]:
    m = _INDEXED_RE.match(p)
    parts += [m.group(1), m.group(2)] if m else [p]
  parts.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(parts)


def unet_from_diffusers(state: Mapping[str, np.ndarray], config: UNetConfig, *,
                        source: str = "state dict", dtype=jnp.float32) -> Dict[str, Any]:
  """diffusers ``UNet2DConditionModel`` state dict (numpy) -> our params tree.

  Raises ValueError naming ``source`` and any unknown key, missing key or wrong shape.
  """
  expected = expected_shapes(config)
  return io.convert_state(state, _key_fn(expected), expected, source=source, dtype=dtype,
                          describe=_to_key)


def unet_to_diffusers(params, config: UNetConfig) -> Dict[str, np.ndarray]:
  """Our params tree -> diffusers state dict (float32 numpy, torch layouts).

  Checks the tree against ``config`` first (ValueError naming missing / extra / wrong
  shaped params).
  """
  flat = io.check_tree(params, expected_shapes(config), "unet_to_diffusers")
  out = {}
  for path, v in flat.items():
    a = np.asarray(jax.device_get(v), dtype=np.float32)
    if path[-1] == "kernel":
      a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
    out[_to_key(path)] = np.ascontiguousarray(a)
  return out


def _unet_dir(path: Any, subfolder: str) -> str:
  """The folder holding the UNet's config.json: ``path/subfolder`` or ``path`` itself."""
  p = os.fspath(path)
  if os.path.isdir(p):
    root = p
  else:
    root = io.resolve_model_dir(p, marker="model_index.json", expected=_EXPECTED_FILES)
  sub = os.path.join(root, subfolder) if subfolder else root
  if os.path.isfile(os.path.join(sub, "config.json")):
    return sub
  if os.path.isfile(os.path.join(root, "config.json")) and not os.path.isfile(
      os.path.join(root, "model_index.json")):
    return root  # the unet folder itself
  raise FileNotFoundError(
      f"{root}: no UNet found (looked for {os.path.join(sub, 'config.json')} and "
      f"{os.path.join(root, 'config.json')}). Expected a diffusers pipeline folder with "
      f"{_EXPECTED_FILES}, or the unet folder itself.")


def _read_weights(unet_dir: str, allow_pickle: bool) -> Dict[str, np.ndarray]:
  """The exact ``diffusion_pytorch_model.safetensors`` when present (pipelines often also
  hold ``.fp16`` variants), else its sharded index, else the ``.bin`` pickle (only with
  ``allow_pickle``), else whatever :func:`io.read_state_dict` finds."""
  state = io.read_named_weights(unet_dir, WEIGHTS_NAME, allow_pickle=allow_pickle)
  if state is not None:
    return state
  return io.read_state_dict(unet_dir, allow_pickle=allow_pickle, prefix=WEIGHTS_NAME,
                            expected=_EXPECTED_FILES)


def load_unet(path: Any, *, subfolder: str = "unet", allow_pickle: bool = False,
              dtype=jnp.float32) -> Tuple[UNetConfig, UNet2DCondition, Dict[str, Any]]:
  """Loads a diffusers UNet: ``(UNetConfig, UNet2DCondition module, params)``.

  Args:
    path: a diffusers pipeline folder, a hub id in the local HF cache (found by its
      ``model_index.json``), or the unet folder itself.
    subfolder: the UNet's folder inside the pipeline.
    allow_pickle: also accept ``diffusion_pytorch_model.bin`` (``torch.load(
      weights_only=True)``) when there is no safetensors file.
    dtype: params dtype (float32 by default); the module computes in float32 -- use
      ``module.clone(dtype=jnp.bfloat16)`` for bf16 compute.
  """
  unet_dir = _unet_dir(path, subfolder)
  config_path = os.path.join(unet_dir, "config.json")
  d = io.read_json(config_path, expected=_EXPECTED_FILES)
  if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise ValueError(f"{config_path}: _class_name={d['_class_name']!r}, expected "
                     "'UNet2DConditionModel'")
  try:
    config = UNetConfig.from_diffusers(d)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  state = _read_weights(unet_dir, allow_pickle)
  params = unet_from_diffusers(state, config, source=unet_dir, dtype=dtype)
  return config, UNet2DCondition(config), params


def save_unet(folder: Any, config: Union[UNetConfig, Mapping[str, Any]], params) -> str:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` into ``folder``
  (diffusers layout, float32). ``config`` is a :class:`UNetConfig` or a diffusers config
  dict (written as given, so extra keys of the original survive). Returns the folder.

  Refuses params that do not match the config or hold NaN / Inf.
  """
  if isinstance(config, UNetConfig):
    cfg, d = config, config.to_diffusers()
  else:
    d = dict(config)
    cfg = UNetConfig.from_diffusers(d)
  state = unet_to_diffusers(params, cfg)
  for k, v in state.items():
    if not np.all(np.isfinite(v)):
      raise ValueError(f"save_unet: {k} holds NaN or Inf; not writing {folder}")
  d.setdefault("_class_name", "UNet2DConditionModel")
  return io.save_folder(folder, d, state, f"{WEIGHTS_NAME}.safetensors")


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def lora_to_diffusers(lora_tree: Mapping[str, Mapping[str, Any]], config: UNetConfig, *,
                      alpha: float, rank: int, prefix: str = "unet/") -> Dict[str, np.ndarray]:
  """An rft LoRA tree on the UNet (``rft.models.lora``: ``{"unet/.../kernel": {"a", "b"}}``
  with W' = W + (alpha/rank) · A @ B over W's ``[fan_in, fan_out]`` view) -> diffusers'
  PEFT-format LoRA state dict: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with
  ΔW_torch = lora_B @ lora_A at scale 1 (alpha/rank is folded into lora_B, so a loader
  that assumes lora_alpha = rank reproduces W'). Linear kernels [in, out] give lora_A
  [r, in], lora_B [out, r]; 3x3 conv kernels [kh, kw, in, out] give a conv lora_A
  [r, in, kh, kw] and a 1x1 lora_B [out, r, 1, 1] (PEFT's Conv2d LoRA)."""
  expected = expected_shapes(config)
  scale = float(alpha) / rank
  out: Dict[str, np.ndarray] = {}
  for path, ab in lora_tree.items():
    if not path.startswith(prefix):
      raise ValueError(f"lora_to_diffusers: {path!r} is not a UNet param (prefix {prefix!r})")
    key = tuple(path[len(prefix):].split("/"))
    if key not in expected or key[-1] != "kernel":
      raise ValueError(f"lora_to_diffusers: {path!r} is not a kernel of this UNet")
    shape = expected[key]
    a = np.asarray(jax.device_get(ab["a"]), np.float32)
    b = np.asarray(jax.device_get(ab["b"]), np.float32) * scale
    module = "unet." + _to_key(key)[:-len(".weight")]
    if len(shape) == 2:
      lora_a, lora_b = a.T, b.T
    elif len(shape) == 4:
      kh, kw, cin, _ = shape
      lora_a = np.transpose(a.reshape(kh, kw, cin, -1), (3, 2, 0, 1))
      lora_b = b.T[:, :, None, None]
    else:
      raise ValueError(f"lora_to_diffusers: {path!r} has shape {shape}")
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
  return out


def save_unet_lora(folder: Any, config: UNetConfig, lora_tree, *, alpha: float,
                   rank: int) -> str:
  """Writes ``pytorch_lora_weights.safetensors`` (``lora_to_diffusers``) into ``folder``:
  ``StableDiffusionPipeline.load_lora_weights(folder)`` (diffusers with peft) applies it
  to the base pipeline's UNet. Refuses NaN / Inf. Returns the file's path."""
  state = lora_to_diffusers(lora_tree, config, alpha=alpha, rank=rank)
  for k, v in state.items():
    if not np.all(np.isfinite(v)):
      raise ValueError(f"save_unet_lora: {k} holds NaN or Inf; not writing {folder}")
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  target = paths.path(folder) / LORA_WEIGHTS_NAME
  paths.write_bytes(target, save(state, metadata={"format": "pt"}))
  return str(target)
