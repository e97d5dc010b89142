"""Stable Diffusion 1.x / 2.x from a diffusers-format folder -> rft modules and params.

The folder (or a hub id already in the local HF cache) is what
``StableDiffusionPipeline.save_pretrained`` writes and what the hub serves::

  model_index.json
  unet/          config.json + diffusion_pytorch_model.safetensors   (rft.weights.sd_unet)
  vae/           config.json + diffusion_pytorch_model.safetensors   (rft.weights.vae)
  text_encoder/  config.json + model.safetensors (CLIPTextModel)     (rft.weights.clip)
  tokenizer/     CLIPTokenizer files (loaded with transformers)
  scheduler/     scheduler_config.json (betas, prediction type, steps offset)

Pickle weights (``*.bin``) load only with ``allow_pickle=True``. The params tree is
``{"unet": ..., "text_encoder": ..., "vae": ...}``: the online loop trains ``^unet/``
(or LoRA on it) and passes the frozen parts to jitted code as arguments.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np

from rft.diffusion.schedules import Schedule, make_schedule
from rft.weights import io

EXPECTED = ("model_index.json, unet/ (config.json + diffusion_pytorch_model.safetensors), "
            "vae/ (same), text_encoder/ (config.json + model.safetensors), tokenizer/ and "
            "scheduler/scheduler_config.json")
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine"}
_COMPONENT_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                      "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                      "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
  """What rft's DDIM needs from ``scheduler_config.json``."""

  schedule: Schedule
  prediction_type: str  # "epsilon" or "v_prediction"
  steps_offset: int


def scheduler_from_config(d: dict, *, source: str = "scheduler_config.json") -> SchedulerSpec:
  """diffusers scheduler config (DDIM / PNDM / DDPM / Euler ... of SD) -> SchedulerSpec.

  Honoured: num_train_timesteps, beta_start, beta_end, beta_schedule (linear,
  scaled_linear, squaredcos_cap_v2), prediction_type (epsilon, v_prediction),
  steps_offset; ``timestep_spacing`` must be "leading" (SD's) and ``trained_betas``,
  ``thresholding`` and ``rescale_betas_zero_snr`` are unsupported (ValueError naming
  them). rft's DDIM always takes ``alphas_cumprod[0]`` for the step past t=0
  (``set_alpha_to_one=False``, SD's setting); a config asking for True is logged.
  """
  def bad(key, value, why):
    raise ValueError(f"{source}: {key}={value!r} is not supported: {why}")

  beta = d.get("beta_schedule", "linear")
  if beta not in _BETA_SCHEDULES:
    bad("beta_schedule", beta, f"use one of {sorted(_BETA_SCHEDULES)}")
  if d.get("trained_betas") is not None:
    bad("trained_betas", "...", "explicit beta lists are not implemented")
  if d.get("thresholding"):
    bad("thresholding", d["thresholding"], "dynamic thresholding is not implemented")
  if d.get("rescale_betas_zero_snr"):
    bad("rescale_betas_zero_snr", True, "zero-terminal-SNR rescaling is not implemented")
  spacing = d.get("timestep_spacing", "leading")
  if spacing != "leading":
    bad("timestep_spacing", spacing, "rft's DDIM uses diffusers' 'leading' spacing")
  pred = d.get("prediction_type", "epsilon")
  if pred not in ("epsilon", "v_prediction"):
    bad("prediction_type", pred, "use epsilon or v_prediction")
  if d.get("set_alpha_to_one"):
    logging.warning("%s: set_alpha_to_one=True; rft's DDIM uses alphas_cumprod[0] for the "
                    "final step (set_alpha_to_one=False)", source)
  schedule = make_schedule(_BETA_SCHEDULES[beta], int(d.get("num_train_timesteps", 1000)),
                           float(d.get("beta_start", 0.0001)), float(d.get("beta_end", 0.02)))
  return SchedulerSpec(schedule, pred, int(d.get("steps_offset", 0)))


@dataclasses.dataclass
class StableDiffusion:
  """The loaded pieces of a Stable Diffusion pipeline (modules are stateless)."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  params: dict  # {"unet", "text_encoder", "vae"}
  scheduler: SchedulerSpec
  unet_config: Any
  vae_config: Any
  path: str
  resolution: int  # image side in pixels (unet sample_size x VAE downsampling)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    f = self.vae_factor
    return (self.resolution // f, self.resolution // f, self.unet_config.in_channels)

  @property
  def vae_factor(self) -> int:
    return self.vae_config.downscale

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    return tokenize(self.tokenizer, texts)


def tokenize(tokenizer, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
  """CLIP token ids [N, max_length] int32, padded to max_length and truncated, as
  diffusers' StableDiffusionPipeline tokenises prompts."""
  from rft.weights.sd3_text import clip_max_length  # pylint: disable=g-import-not-at-top
  n = max_length or clip_max_length(tokenizer)
  out = tokenizer(list(texts), padding="max_length", max_length=n, truncation=True,
                  return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)


def _check_index(model_dir: str) -> dict:
  index = io.read_json(os.path.join(model_dir, "model_index.json"), expected=EXPECTED)
  for name, classes in _COMPONENT_CLASSES.items():
    entry = index.get(name)
    if not entry or not isinstance(entry, (list, tuple)) or entry[-1] is None:
      raise ValueError(f"{model_dir}/model_index.json has no {name!r} component; expected "
                       f"{EXPECTED}")
    if entry[-1] not in classes:
      raise ValueError(f"{model_dir}/model_index.json: {name} is a {entry[-1]}; rft "
                       f"supports {classes}")
  return index


def load_sd(path: Any, *, allow_pickle: bool = False, dtype=jnp.float32,
            resolution: int | None = None) -> StableDiffusion:
  """Loads a diffusers-format Stable Diffusion folder (or cached hub id) into rft.

  ``dtype`` is the modules' computation dtype (params stay float32). ``resolution``
  defaults to the UNet's ``sample_size`` times the VAE factor (512 for SD 1.x).
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from rft.weights.clip import load_clip_text_encoder  # pylint: disable=g-import-not-at-top
  from rft.weights.sd_unet import load_unet  # pylint: disable=g-import-not-at-top
  from rft.weights.vae import load_vae  # pylint: disable=g-import-not-at-top

  model_dir = io.resolve_model_dir(path, marker="model_index.json", expected=EXPECTED)
  _check_index(model_dir)
  unet_cfg, unet, unet_params = load_unet(model_dir, allow_pickle=allow_pickle)
  if dtype != jnp.float32:
    unet = unet.clone(dtype=dtype)
  vae_cfg, vae, vae_params = load_vae(model_dir, allow_pickle=allow_pickle, compute_dtype=dtype)
  _, text, text_params = load_clip_text_encoder(model_dir, subfolder="text_encoder",
                                                allow_pickle=allow_pickle, dtype=dtype)
  tok_dir = os.path.join(model_dir, "tokenizer")
  if not os.path.isdir(tok_dir):
    raise FileNotFoundError(f"{tok_dir}: missing (the CLIP tokenizer files); expected "
                            f"{EXPECTED}")
  tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  sched_path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
  scheduler = scheduler_from_config(io.read_json(sched_path, expected=EXPECTED),
                                    source=sched_path)
  factor = vae_cfg.downscale
  unet_json = io.read_json(os.path.join(model_dir, "unet", "config.json"), expected=EXPECTED)
  res = resolution or int(unet_json.get("sample_size", 64)) * factor
  if res % (factor * 2 ** (len(unet_cfg.block_out_channels) - 1)):
    raise ValueError(f"resolution {res} is not divisible by the VAE factor {factor} times "
                     f"the UNet's downsampling")
  return StableDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                         params={"unet": unet_params, "text_encoder": text_params,
                                 "vae": vae_params},
                         scheduler=scheduler, unet_config=unet_cfg, vae_config=vae_cfg,
                         path=model_dir, resolution=res)
