"""Text-to-image sampling pipeline: tokens -> text states -> CFG sampler with log-probs -> images.

The rollout every online objective uses. For pixel-space models (ShapesWorld) the
final latent is the image; latent-space models (Stable Diffusion, ``sd_pipeline``) add a
decoder: ``pipe.images(params, latents)`` is what rewards see, in [-1, 1].
Every function takes the full params tree as an argument (never a closure constant), so
frozen parts (text encoder, VAE) travel into jitted code as arguments too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rft.diffusion import ddim, sampling
from rft.diffusion.sampling import SamplerConfig  # noqa: F401  (re-exported)
from rft.diffusion.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Text2ImagePipeline:
  """encode(params, tokens) -> cond; model_fn(params, x, t, cond) -> the model's output,
  a `prediction` ("eps" or "v") that the sampler (`sampler(cfg)`) interprets; `eps_fn`
  is the same model as an eps prediction (denoising losses, eps-only callers)."""

  encode: Callable[[Any, jax.Array], Any]
  model_fn: Callable
  schedule: Schedule
  sample_shape: tuple[int, ...]  # per-example latent shape, e.g. (16, 16, 3)
  # decode(params, latents) -> images in [-1, 1]; None: the latents are the images.
  decode: Callable[[Any, jax.Array], jax.Array] | None = None
  # Token ids [1, L] of the empty prompt (CFG's unconditional branch); None: all pad (0).
  null_tokens: Any = None
  prediction: str = "eps"
  # Fields set on every sampler `sampler(cfg)` builds (dataclasses.replace), e.g.
  # {"mu": ...}: a dynamically shifted flow schedule's mu for this image size.
  sampler_fields: Any = None

  def sampler(self, cfg: SamplerConfig):
    """The configured sampler for this model's prediction type (with `sampler_fields`)."""
    s = cfg.build(self.schedule, prediction=self.prediction)
    if not self.sampler_fields:
      return s
    fields = {f.name for f in dataclasses.fields(s)} if dataclasses.is_dataclass(s) else set()
    missing = sorted(set(self.sampler_fields) - fields)
    if missing:
      raise ValueError(f"sampler {cfg.name!r} ({type(s).__name__}) has no field(s) {missing} "
                       "that this pipeline sets (a flow model with dynamic shifting needs a "
                       "flow sampler's mu)")
    return dataclasses.replace(s, **dict(self.sampler_fields))

  @property
  def eps_fn(self) -> Callable:
    """model_fn as an eps prediction (v converted with the schedule's alphas_cumprod)."""
    if self.prediction == "eps":
      return self.model_fn
    if self.prediction != "v":
      raise ValueError(f"no eps form for prediction {self.prediction!r} (a flow model: use "
                       "its sampler's predicted_x0 / the flow loss)")
    model_fn, ac = self.model_fn, self.schedule.alphas_cumprod

    def eps_fn(params, x, t, cond):
      return ddim.v_to_eps(model_fn(params, x, t, cond), x, ac[jnp.asarray(t, jnp.int32)])
    return eps_fn

  def conditions(self, params, tokens):
    """(cond for each prompt, null cond of the empty prompt with batch dim 1)."""
    cond = self.encode(params, tokens)
    null_tokens = (jnp.zeros_like(tokens[:1]) if self.null_tokens is None
                   else jnp.asarray(self.null_tokens, tokens.dtype))
    null = self.encode(params, null_tokens)
    return cond, null

  def images(self, params, latents):
    """What rewards and evaluators see: decoded latents in [-1, 1]."""
    return latents if self.decode is None else self.decode(params, latents)

  def initial_noise(self, key, batch: int, share_within: int = 1) -> jax.Array:
    """x_T [batch, *sample_shape] ~ N(0, I); with share_within = G > 1 each run of G
    consecutive rows (one prompt's group) starts from the same x_T (DanceGRPO's shared
    initial noise: a group's rewards then differ only through the sampler's step noise)."""
    if share_within <= 1:
      return jax.random.normal(key, (batch, *self.sample_shape), jnp.float32)
    if batch % share_within:
      raise ValueError(f"a batch of {batch} rows is not whole groups of {share_within}")
    x = jax.random.normal(key, (batch // share_within, *self.sample_shape), jnp.float32)
    return jnp.repeat(x, share_within, axis=0)

  def sample(self, params, tokens, key, cfg: SamplerConfig, *, share_within: int = 1,
             record_x0: bool = False, sde_steps=None, ref_params=None
             ) -> tuple[sampling.Trajectory, Any, Any]:
    """Sample one trajectory per row of `tokens`: (trajectory, cond, null_cond).

    share_within: rows per shared x_T (see initial_noise); record_x0: keep each step's
    x0 prediction in the trajectory (``Trajectory.x0_preds``); sde_steps: bool [steps],
    the only stochastic steps (the rest ODE; `sampling.rollout`); ref_params: also
    record each transition's log-prob under these params (``Trajectory.ref_log_probs``,
    scored with the same text conditions).
    """
    cond, null = self.conditions(params, tokens)
    k_init, k_steps = jax.random.split(key)
    x_T = self.initial_noise(k_init, tokens.shape[0], share_within)
    traj = sampling.rollout(self.model_fn, params, self.sampler(cfg), x_T, cond, null,
                            num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                            key=k_steps, record_x0=record_x0, sde_steps=sde_steps,
                            ref_params=ref_params)
    return traj, cond, null


def shapes_pipeline(model, schedule: Schedule, image_size: int = 16) -> Text2ImagePipeline:
  from rft.models.t2i import make_encode_fn, make_eps_fn
  return Text2ImagePipeline(make_encode_fn(model), make_eps_fn(model), schedule,
                            (image_size, image_size, 3))


def world_pipeline(model, schedule: dict, image_size: int = 16) -> Text2ImagePipeline:
  """A ShapesWorld base model's pipeline from its bundle's meta["schedule"]: {"name":
  "flow", ...FlowSchedule fields} for a rectified-flow model, else a DDPM schedule
  (rft.diffusion.schedules.make_schedule keys) for an eps-prediction UNet."""
  schedule = dict(schedule)
  if schedule.get("name") == "flow":
    from rft.diffusion.flow import FlowSchedule
    schedule.pop("name")
    return flow_pipeline(model, FlowSchedule(**schedule), image_size)
  from rft.diffusion.schedules import make_schedule
  return shapes_pipeline(model, make_schedule(**schedule), image_size)


def flow_pipeline(model, schedule, image_size: int = 16) -> Text2ImagePipeline:
  """A ShapesWorld rectified-flow model (rft.models.dit.TextToImageDiT; velocity output,
  model time sigma * 1000) on a rft.diffusion.flow.FlowSchedule: use the "flow" sampler."""
  from rft.models.t2i import make_encode_fn, make_eps_fn
  return Text2ImagePipeline(make_encode_fn(model), make_eps_fn(model), schedule,
                            (image_size, image_size, 3), prediction="velocity")


def sd_pipeline(sd) -> Text2ImagePipeline:
  """Stable Diffusion (``rft.weights.sd.load_sd``) as a Text2ImagePipeline.

  params = {"unet", "text_encoder", "vae"}. cond = the text encoder's last hidden state
  [B, 77, D] (diffusers' StableDiffusionPipeline); the null cond encodes the empty
  prompt ""; model_fn is the UNet (its prediction type from the scheduler config: "eps" or
  "v", which the sampler converts after guidance, as diffusers does); ``images`` decodes latents / scaling
  factor with the VAE, clipped to [-1, 1], under ``jax.checkpoint`` (reward backprop
  keeps only the latents, not the decoder's activations).
  """
  unet, vae, text = sd.unet, sd.vae, sd.text_encoder
  schedule = sd.scheduler.schedule
  prediction = "v" if sd.scheduler.prediction_type == "v_prediction" else "eps"
  if sd.scheduler.steps_offset != 1:
    raise ValueError(f"{sd.path}: scheduler steps_offset={sd.scheduler.steps_offset}; rft's "
                     "DDIM sampler uses steps_offset=1 (Stable Diffusion's)")

  def encode(params, tokens):
    return text.apply({"params": params["text_encoder"]}, tokens)["last_hidden_state"]

  def model_fn(params, x, t, cond):
    return unet.apply({"params": params["unet"]}, x, t, cond)

  @jax.checkpoint
  def decode(params, latents):
    images = vae.apply({"params": params["vae"]}, latents, method=vae.latents_to_images)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return Text2ImagePipeline(encode, model_fn, schedule, sd.latent_shape, decode=decode,
                            null_tokens=sd.tokenize([""]), prediction=prediction)


def sd3_pipeline(sd3) -> Text2ImagePipeline:
  """Stable Diffusion 3 (``rft.weights.sd3.load_sd3``) as a Text2ImagePipeline.

  params = {"transformer", "vae", "text_encoder", "text_encoder_2"[, "text_encoder_3"]};
  tokens are ``StableDiffusion3.tokenize``'s concatenated CLIP-L / CLIP-G / T5 ids. cond =
  {"states": prompt_embeds [B, L, J], "pooled": pooled_prompt_embeds [B, P]}
  (diffusers' ``StableDiffusion3Pipeline.encode_prompt``); the null cond encodes the
  empty prompt "" the same way (diffusers' default negative prompt); model_fn is the
  MMDiT at model time t = sigma * 1000, predicting the flow velocity (use the "flow" /
  "flow_cps" samplers; eta 0 is diffusers' Euler ODE). A dynamically shifted schedule
  gets its mu for this resolution's image sequence length through ``sampler``.
  ``images`` decodes latents / scaling_factor + shift_factor with the VAE, clipped to
  [-1, 1], under ``jax.checkpoint``.
  """
  from rft.weights.sd3_text import encode_sd3_prompt
  transformer, vae, encoders = sd3.transformer, sd3.vae, sd3.text.encoders
  split = sd3.split_tokens

  def encode(params, tokens):
    states, pooled = encode_sd3_prompt(encoders, params, split(jnp.asarray(tokens)))
    return {"states": states, "pooled": pooled}

  def model_fn(params, x, t, cond):
    return transformer.apply({"params": params["transformer"]}, x, t, cond["states"],
                             cond["pooled"])

  @jax.checkpoint
  def decode(params, latents):
    images = vae.apply({"params": params["vae"]}, latents, method=vae.latents_to_images)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  mu = sd3.mu
  return Text2ImagePipeline(encode, model_fn, sd3.schedule, sd3.latent_shape, decode=decode,
                            null_tokens=sd3.tokenize([""]), prediction="velocity",
                            sampler_fields=None if mu is None else {"mu": mu})
