"""Stable Diffusion 3 / 3.5 from a diffusers-format folder -> rft modules and params.

The folder (or a hub id, cached or downloaded: io.resolve_model_dir) is what
``StableDiffusion3Pipeline.save_pretrained`` writes and what the hub serves::

  model_index.json   _class_name StableDiffusion3Pipeline
  transformer/       SD3Transformer2DModel: config.json + diffusion_pytorch_model.safetensors
                     (rft.weights.mmdit)
  vae/               AutoencoderKL, 16 latent channels, scaling + shift factor (rft.weights.vae)
  text_encoder/, text_encoder_2/, text_encoder_3/ and tokenizer/, tokenizer_2/,
  tokenizer_3/       two CLIPs and T5 (rft.weights.sd3_text; T5 optional)
  scheduler/         scheduler_config.json of a FlowMatchEulerDiscreteScheduler

The params tree is ``{"transformer", "vae", "text_encoder", "text_encoder_2"[,
"text_encoder_3"]}``: the online loop trains ``^transformer/`` (or LoRA on it) and
passes the frozen parts to jitted code as arguments. ``rft.diffusion.pipeline.
sd3_pipeline`` turns a :class:`StableDiffusion3` into the rollout pipeline.

Tokens: :meth:`StableDiffusion3.tokenize` gives ONE int32 array per prompt set, the
CLIP-L, CLIP-G and T5 ids concatenated along the sequence (``[N, 77 + 77 + L3]``), so the
loop can index, batch and shard them like SD1's; :meth:`StableDiffusion3.split_tokens`
undoes it inside the encoder.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from rft.diffusion.flow import FlowSchedule
from rft.weights import io

__all__ = ["StableDiffusion3", "load_sd3", "flow_schedule_from_config", "PIPELINE_CLASS"]

PIPELINE_CLASS = "StableDiffusion3Pipeline"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
EXPECTED = (f"model_index.json ({PIPELINE_CLASS}), transformer/ (SD3Transformer2DModel: "
            "config.json + diffusion_pytorch_model.safetensors), vae/ (AutoencoderKL: same), "
            "text_encoder/, text_encoder_2/ (CLIPTextModelWithProjection), text_encoder_3/ "
            "(T5EncoderModel), tokenizer/, tokenizer_2/, tokenizer_3/ and "
            f"scheduler/scheduler_config.json ({SCHEDULER_CLASS})")
_COMPONENT_CLASSES = {"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
                      "scheduler": (SCHEDULER_CLASS,)}
# scheduler_config.json keys FlowSchedule takes (with diffusers' defaults) ...
_SCHEDULE_KEYS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
# ... and the ones it only accepts at these (diffusers' default) values.
_DEFAULT_ONLY = {"invert_sigmas": False, "use_karras_sigmas": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "stochastic_sampling": False, "shift_terminal": None,
                 "time_shift_type": "exponential"}


def flow_schedule_from_config(d: Dict[str, Any], *,
                              source: str = "scheduler_config.json") -> FlowSchedule:
  """A diffusers ``FlowMatchEulerDiscreteScheduler`` config -> :class:`FlowSchedule`.

  Honoured: num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift,
  base_image_seq_len, max_image_seq_len. invert_sigmas, use_karras_sigmas,
  use_exponential_sigmas, use_beta_sigmas, stochastic_sampling, shift_terminal and a
  time_shift_type other than "exponential" are not implemented, nor is any other key or
  scheduler class: ValueError naming the key (rft's sigmas would silently differ).
  """
  name = d.get("_class_name", SCHEDULER_CLASS)
  if name != SCHEDULER_CLASS:
    raise ValueError(f"{source}: _class_name={name!r} is not supported; SD3 in rft uses "
                     f"{SCHEDULER_CLASS} (rft.diffusion.flow.FlowSchedule)")
  kw = {}
  for key, value in d.items():
    if key.startswith("_"):
      continue
    if key in _SCHEDULE_KEYS:
      kw[key] = value if value is not None else _SCHEDULE_KEYS[key]
    elif key in _DEFAULT_ONLY:
      default = _DEFAULT_ONLY[key]
      if value != default and not (default is False and value is None):
        raise ValueError(f"{source}: {key}={value!r} is not supported (rft's FlowSchedule "
                         f"implements only {key}={default!r})")
    else:
      raise ValueError(f"{source}: unknown scheduler config key {key}={value!r}; rft's "
                       f"FlowSchedule takes {sorted(_SCHEDULE_KEYS)}")
  try:
    return FlowSchedule(
        num_train_timesteps=int(kw.get("num_train_timesteps", 1000)),
        shift=float(kw.get("shift", 1.0)),
        use_dynamic_shifting=bool(kw.get("use_dynamic_shifting", False)),
        base_shift=float(kw.get("base_shift", 0.5)),
        max_shift=float(kw.get("max_shift", 1.15)),
        base_image_seq_len=int(kw.get("base_image_seq_len", 256)),
        max_image_seq_len=int(kw.get("max_image_seq_len", 4096)))
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


@dataclasses.dataclass
class StableDiffusion3:
  """The loaded pieces of an SD3 pipeline (modules are stateless)."""

  transformer: Any  # rft.models.mmdit.SD3Transformer
  vae: Any  # rft.models.vae.AutoencoderKL
  text: Any  # rft.weights.sd3_text.SD3Text (its params are also in `params`)
  params: dict  # {"transformer", "vae", "text_encoder", "text_encoder_2"[, "text_encoder_3"]}
  schedule: FlowSchedule
  transformer_config: Any  # MMDiTConfig
  vae_config: Any  # VAEConfig
  path: str
  resolution: int  # image side in pixels (transformer sample_size x VAE factor by default)
  max_sequence_length: int  # T5 tokens per prompt

  @property
  def vae_factor(self) -> int:
    return self.vae_config.downscale

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    n = self.resolution // self.vae_factor
    return (n, n, self.transformer_config.in_channels)

  @property
  def image_seq_len(self) -> int:
    """The transformer's image tokens: (latent side / patch size)^2 (dynamic shifting's
    sequence length, as StableDiffusion3Pipeline computes it)."""
    n = self.latent_shape[0] // self.transformer_config.patch_size
    return n * n

  @property
  def mu(self) -> Optional[float]:
    """Dynamic shifting's mu for this resolution (None for a statically shifted schedule)."""
    if not self.schedule.use_dynamic_shifting:
      return None
    return self.schedule.mu_for(self.image_seq_len)

  @property
  def token_lengths(self) -> tuple[int, int, int]:
    """(CLIP-L, CLIP-G, T5) ids per prompt in :meth:`tokenize`'s concatenation."""
    from rft.weights.sd3_text import clip_max_length  # pylint: disable=g-import-not-at-top
    n = clip_max_length(self.text.tokenizers[0])
    return (n, n, self.max_sequence_length)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 ``[N, sum(token_lengths)]``: the three tokenisations of
    ``StableDiffusion3Pipeline.encode_prompt`` side by side."""
    t = self.text.tokenize(list(texts), self.max_sequence_length)
    return np.concatenate([t["clip_l"], t["clip_g"], t["t5"]], axis=1).astype(np.int32)

  def split_tokens(self, tokens) -> Dict[str, Any]:
    """:meth:`tokenize`'s array (numpy or traced) -> ``{"clip_l", "clip_g", "t5"}``."""
    a, b, c = self.token_lengths
    if tokens.shape[-1] != a + b + c:
      raise ValueError(f"SD3 tokens have {tokens.shape[-1]} ids per prompt; expected "
                       f"{a} + {b} + {c} (CLIP-L, CLIP-G, T5: StableDiffusion3.tokenize)")
    return {"clip_l": tokens[:, :a], "clip_g": tokens[:, a:a + b], "t5": tokens[:, a + b:]}


def _check_index(model_dir: str) -> dict:
  index = io.read_json(os.path.join(model_dir, "model_index.json"), expected=EXPECTED)
  cls = index.get("_class_name")
  if cls != PIPELINE_CLASS:
    raise ValueError(f"{model_dir}/model_index.json: _class_name={cls!r}; rft's SD3 loader "
                     f"reads {PIPELINE_CLASS} folders (an SD 1.x / 2.x folder: config.world="
                     "'sd', rft.weights.sd.load_sd)")
  for name, classes in _COMPONENT_CLASSES.items():
    entry = index.get(name)
    if not entry or not isinstance(entry, (list, tuple)) or entry[-1] is None:
      raise ValueError(f"{model_dir}/model_index.json has no {name!r} component; expected "
                       f"{EXPECTED}")
    if entry[-1] not in classes:
      raise ValueError(f"{model_dir}/model_index.json: {name} is a {entry[-1]}; rft "
                       f"supports {classes}")
    if not os.path.isdir(os.path.join(model_dir, name)):
      raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing component {name!r} "
                              f"(listed in model_index.json); expected {EXPECTED}")
  return index


def load_sd3(path: Any, *, allow_pickle: bool = False, dtype=jnp.float32,
             resolution: Optional[int] = None, load_t5: bool = True,
             max_sequence_length: Optional[int] = None) -> StableDiffusion3:
  """Loads a diffusers-format Stable Diffusion 3 folder (or cached hub id) into rft.

  ``dtype`` is the modules' computation dtype (params stay float32). ``resolution``
  defaults to the transformer's ``sample_size`` times the VAE factor (1024 for SD3).
  ``load_t5=False`` skips T5 (its prompt states become zeros, as diffusers with
  ``text_encoder_3=None``). ``max_sequence_length``: T5 tokens per prompt (diffusers'
  default 256). Raises ValueError / FileNotFoundError naming a missing or unsupported
  component, scheduler option or pipeline class.
  """
  from rft.weights import sd3_text  # pylint: disable=g-import-not-at-top
  from rft.weights.mmdit import load_mmdit  # pylint: disable=g-import-not-at-top
  from rft.weights.vae import load_vae  # pylint: disable=g-import-not-at-top

  model_dir = io.resolve_model_dir(path, marker="model_index.json", expected=EXPECTED)
  _check_index(model_dir)
  sd3_text._check_index(model_dir, load_t5)  # pylint: disable=protected-access
  sched_path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
  schedule = flow_schedule_from_config(io.read_json(sched_path, expected=EXPECTED),
                                       source=sched_path)
  t_cfg, transformer, t_params = load_mmdit(model_dir, allow_pickle=allow_pickle,
                                            compute_dtype=dtype)
  vae_cfg, vae, vae_params = load_vae(model_dir, allow_pickle=allow_pickle,
                                      compute_dtype=dtype)
  if vae_cfg.latent_channels != t_cfg.in_channels:
    raise ValueError(f"{model_dir}: the VAE has {vae_cfg.latent_channels} latent channels, the "
                     f"transformer takes {t_cfg.in_channels}")
  text = sd3_text.load_sd3_text(model_dir, allow_pickle=allow_pickle, dtype=dtype,
                                load_t5=load_t5)
  factor = vae_cfg.downscale
  res = int(resolution or t_cfg.sample_size * factor)
  if res % (factor * t_cfg.patch_size):
    raise ValueError(f"resolution {res} is not divisible by the VAE factor {factor} times the "
                     f"transformer's patch size {t_cfg.patch_size}")
  grid = res // factor // t_cfg.patch_size
  if t_cfg.pos_embed_max_size is not None and grid > t_cfg.pos_embed_max_size:
    raise ValueError(f"resolution {res} gives {grid}x{grid} patches, more than the "
                     f"transformer's pos_embed_max_size={t_cfg.pos_embed_max_size}")
  params = {"transformer": t_params, "vae": vae_params, **text.params}
  return StableDiffusion3(
      transformer=transformer, vae=vae, text=text, params=params, schedule=schedule,
      transformer_config=t_cfg, vae_config=vae_cfg, path=model_dir, resolution=res,
      max_sequence_length=int(max_sequence_length or sd3_text.DEFAULT_MAX_SEQUENCE_LENGTH))
