"""What the online diffusion loop finetunes: a model + its prompts + how to judge samples.

``config.world`` picks one:

* ``"shapes"`` -- ShapesWorld: the shipped text-to-image base model (pretrained when
  absent), 3,168 captions with a held-out split, the independent evaluator as judge.
* ``"sd"`` -- a Stable Diffusion 1.x / 2.x diffusers folder (``config.model_path``,
  a local folder or a hub id in the HF cache) with a prompt set
  (``config.prompt_set``: "animals45", "hpdv2", "pickapic" or a prompt file), judged by
  the configured rewards on fixed train / held-out prompts (there is no independent
  evaluator for real images).
* ``"sd3"`` -- a Stable Diffusion 3 / 3.5 diffusers folder (``config.model_path``; the
  MMDiT is finetuned on a rectified-flow sampler: ``config.sampler.name="flow"``), with
  prompts and rewards as ``"sd"``. ``config.load_t5=False`` skips T5-XXL (zero states).

All give the loop the same things: ``pipe`` (a Text2ImagePipeline whose ``images``
decodes latents), the full ``base_params`` tree, the prompt ``texts`` and their ``tokens``,
prompt sampling per split, the per-sample ``reward_prompts`` dict, the kwargs the reward
factories get, an ``evaluate`` hook (metrics, images and per-image verdicts, or None), the
caption ``families`` of prompts (None: one family) and an ``export`` of the finetuned model.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from rft import paths, pretrained
from rft.data import shapes
from rft.diffusion.pipeline import Text2ImagePipeline, world_pipeline

SPLITS = ("train", "heldout")


class ShapesSetup:
  """ShapesWorld with the shipped base model and evaluator."""

  name = "shapes"

  def __init__(self, config, workdir: str):
    from rft.train.pretrain import load_judge, load_or_pretrain_base
    self.model, self.base_params, self.meta = load_or_pretrain_base(workdir,
                                                                    config.base_dir or None)
    self.pipe: Text2ImagePipeline = world_pipeline(self.model, self.meta["schedule"],
                                                   shapes.IMAGE_SIZE)
    self.world = shapes.ShapesWorld(self.meta["holdout_fraction"], self.meta["split_seed"])
    self.texts = self.world.texts
    self.tokens = shapes.tokenizer().encode(self.texts)
    self.reward_kwargs = {"scorer_dir": config.scorer_dir or None}
    self.judge = load_judge(config.scorer_dir)
    self.base_dir = config.base_dir
    self.eval_splits = SPLITS
    # Small-scale setting (PRDP's 45 animal prompts): a fixed set of training captions,
    # drawn once with the split's family mix; training and the "train" evaluation use
    # only these (each evaluated caption repeated eval_prompts / N times).
    n_fixed = int(config.get("train_prompts", 0))
    if n_fixed < 0:
      raise ValueError(f"config.train_prompts={n_fixed}; use 0 (all training captions) or "
                       "a positive number of fixed captions")
    self.fixed_train_ids = (self.world.eval_prompt_ids(
        "train", n_fixed, seed=int(config.get("train_prompts_seed", 0))) if n_fixed else None)

  def sample_prompt_ids(self, rng, n: int, split: str = "train") -> np.ndarray:
    if split == "train" and self.fixed_train_ids is not None:
      return cycled_permutations(rng, self.fixed_train_ids, n)
    return self.world.sample_prompt_ids(rng, n, split)

  def eval_prompt_ids(self, split: str, n: int) -> np.ndarray:
    if split == "train" and self.fixed_train_ids is not None:
      return np.sort(np.resize(self.fixed_train_ids, n))
    return self.world.eval_prompt_ids(split, n)

  def reward_prompts(self, ids) -> dict:
    ids = np.asarray(ids)
    return {"ids": ids, "tokens": self.tokens[ids], "assignments": self.world.assignments(ids)}

  def evaluate(self, sample_images: Callable, ids, key, batch_size: int):
    """(metrics, images [len(ids)], aligned bool [len(ids)]): the independent evaluator's
    alignment and its verdict on each image (None without a judge)."""
    from rft.worlds import shapes_eval
    if self.judge is None:
      return None
    m, images, per_sample = shapes_eval.evaluate_alignment(
        sample_images, self.judge, self.world, ids, key, batch_size=batch_size,
        return_samples=True)
    return m, images, per_sample["aligned"]

  def families(self, ids) -> list[str]:
    """The caption family of each prompt (rft.data.shapes.FAMILIES: single, count, and,
    relation)."""
    return [shapes.FAMILIES[f] for f in self.world.family_ids[np.asarray(ids)]]

  def export(self, final_params, workdir: str, objective: str, results: dict,
             lora=None) -> str:
    """The finetuned model as a bundle: rft.pretrained.load_shapes_base(workdir) (a LoRA
    run's adapter is merged into it)."""
    del lora
    meta = dict(self.meta, command=pretrained.invocation(),
                finetuned_from=self.base_dir or "rft/assets/shapes_base",
                objective=objective, results=results)
    return pretrained.save_bundle("shapes_base", final_params, meta, workdir)


def cycled_permutations(rng, pool: np.ndarray, n: int) -> np.ndarray:
  """n ids from `pool`: random permutations of the whole pool back to back, so every id
  comes up equally often (to within one) in any n."""
  reps = -(-n // len(pool))
  return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


class StableDiffusionSetup:
  """A diffusers-format Stable Diffusion model and a prompt set."""

  name = "sd"

  def __init__(self, config, workdir: str):
    del workdir
    from rft.diffusion.pipeline import sd_pipeline
    from rft.weights import io
    from rft.weights.sd import load_sd
    dtype = _model_dtype(config, "Stable Diffusion")
    with io.pickle_key("allow_pickle"):  # a refusal names --config.allow_pickle
      self.sd = load_sd(config.model_path, allow_pickle=config.allow_pickle, dtype=dtype,
                        resolution=config.resolution or None)
    self.pipe = sd_pipeline(self.sd)
    self.base_params = self.sd.params
    self._init_prompts(config, self.sd.tokenize)
    self.model_path = config.model_path
    logging.info("%s world: %s, %d x %d images, %d train / %d held-out prompts",
                 self.name.upper(), self.sd.path, self.sd.resolution, self.sd.resolution,
                 len(self.split_ids["train"]), len(self.split_ids["heldout"]))

  def _init_prompts(self, config, tokenize: Callable):
    """texts, split_ids, tokens (``tokenize(texts)``: one int array, row per prompt),
    eval_splits and reward_kwargs from config.prompt_set."""
    from rft.data import prompt_sets
    ps = prompt_sets.get_prompt_set(config.prompt_set, holdout_fraction=config.holdout_fraction,
                                    seed=config.seed, key=config.get("prompt_key") or None)
    self.texts = list(ps.train) + list(ps.holdout)
    self.split_ids = {"train": np.arange(len(ps.train)),
                      "heldout": np.arange(len(ps.train), len(self.texts))}
    self.tokens = tokenize(self.texts)
    self.eval_splits = tuple(k for k in SPLITS if len(self.split_ids[k]))
    self.reward_kwargs = {"prompt_texts": self.texts}

  def sample_prompt_ids(self, rng, n: int, split: str = "train") -> np.ndarray:
    pool = self._pool(split)
    return rng.choice(pool, size=n, replace=len(pool) < n)

  def eval_prompt_ids(self, split: str, n: int) -> np.ndarray:
    pool = self._pool(split)
    if n >= len(pool):
      return np.resize(pool, n)  # every prompt, cycled to n samples
    return np.sort(np.random.default_rng(1234).choice(pool, size=n, replace=False))

  def _pool(self, split: str) -> np.ndarray:
    if split not in self.split_ids:
      raise ValueError(f"unknown split {split!r}; use {SPLITS}")
    pool = self.split_ids[split]
    if not len(pool):
      raise ValueError(f"the prompt set has no {split} prompts (config.holdout_fraction)")
    return pool

  def reward_prompts(self, ids) -> dict:
    ids = np.asarray(ids)
    return {"ids": ids, "tokens": self.tokens[ids]}

  def evaluate(self, sample_images, ids, key, batch_size: int):
    del sample_images, ids, key, batch_size
    return None  # no independent evaluator: the loop logs the configured rewards

  def families(self, ids) -> None:
    del ids
    return None  # one family: sample grids pick distinct prompts

  def export(self, final_params, workdir: str, objective: str, results: dict,
             lora=None) -> str:
    """The finetuned UNet as a diffusers folder ``<workdir>/unet`` (loads with
    ``UNet2DConditionModel.from_pretrained`` or rft's ``load_unet``). A LoRA run
    (``lora`` = (trained LoRA tree, alpha, rank)) also writes the adapter alone as
    ``<workdir>/lora/pytorch_lora_weights.safetensors`` in diffusers' PEFT format
    (``pipe.load_lora_weights(<workdir>/lora)`` on the base pipeline)."""
    from rft.weights.sd_unet import save_unet, save_unet_lora
    out = os.path.join(workdir, "unet")
    save_unet(out, self.sd.unet_config, jax.device_get(final_params["unet"]))
    if lora is not None:
      tree, alpha, rank = lora
      save_unet_lora(os.path.join(workdir, "lora"), self.sd.unet_config,
                     jax.device_get(tree), alpha=alpha, rank=rank)
    paths.write_json(os.path.join(out, "rft_finetune.json"), {
        "base_model": self.sd.path, "objective": objective,
        "command": pretrained.invocation(), "results": results}, indent=1)
    return out


class StableDiffusion3Setup(StableDiffusionSetup):
  """A diffusers-format Stable Diffusion 3 / 3.5 model and a prompt set.

  ``tokens`` are ``StableDiffusion3.tokenize``'s rows (CLIP-L, CLIP-G and T5 ids side by
  side; the pipeline's encoder splits them). Prompt sampling, rewards and evaluation are
  the "sd" world's.
  """

  name = "sd3"

  def __init__(self, config, workdir: str):
    del workdir
    from rft.diffusion.pipeline import sd3_pipeline
    from rft.weights import io
    from rft.weights.sd3 import load_sd3
    dtype = _model_dtype(config, "Stable Diffusion 3")
    with io.pickle_key("allow_pickle"):  # a refusal names --config.allow_pickle
      self.sd = load_sd3(config.model_path, allow_pickle=config.allow_pickle, dtype=dtype,
                         resolution=config.resolution or None,
                         load_t5=bool(config.get("load_t5", True)),
                         max_sequence_length=int(config.get("max_sequence_length", 0)) or None)
    self.pipe = sd3_pipeline(self.sd)
    self.base_params = self.sd.params
    self._init_prompts(config, self.sd.tokenize)
    self.model_path = config.model_path
    logging.info("SD3 world: %s, %d x %d images, T5 %s, %d train / %d held-out prompts",
                 self.sd.path, self.sd.resolution, self.sd.resolution,
                 "on" if self.sd.text.encoders.t5 is not None else "off",
                 len(self.split_ids["train"]), len(self.split_ids["heldout"]))

  def export(self, final_params, workdir: str, objective: str, results: dict,
             lora=None) -> str:
    """The finetuned MMDiT as a diffusers folder ``<workdir>/transformer`` (loads with
    ``SD3Transformer2DModel.from_pretrained`` or rft's ``load_mmdit``)."""
    del lora  # merged into final_params (no SD3 adapter export yet)
    from rft.weights.mmdit import save_mmdit
    out = os.path.join(workdir, "transformer")
    save_mmdit(out, self.sd.transformer_config, jax.device_get(final_params["transformer"]))
    paths.write_json(os.path.join(out, "rft_finetune.json"), {
        "base_model": self.sd.path, "objective": objective,
        "command": pretrained.invocation(), "results": results}, indent=1)
    return out


def _model_dtype(config, what: str):
  """config.dtype as a jnp dtype, after checking config.model_path is set."""
  import jax.numpy as jnp
  if not config.model_path:
    raise ValueError(f"config.world={config.world!r} needs config.model_path: a "
                     f"diffusers-format {what} folder or a hub id already in the HF cache")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}.get(config.dtype)
  if dtype is None:
    raise ValueError(f"config.dtype={config.dtype!r}; use float32, bfloat16 or float16")
  return dtype


WORLDS = {"shapes": ShapesSetup, "sd": StableDiffusionSetup, "sd3": StableDiffusion3Setup}


def build(config, workdir: str) -> Any:
  name = config.get("world", "shapes")
  if name not in WORLDS:
    raise ValueError(f"config.world={name!r}; known: {sorted(WORLDS)}")
  return WORLDS[name](config, workdir)
