"""Trained reward models as rewards: "lm_reward_model" (text) and "shapes_preference"
(ShapesWorld images).

    config.reward = "lm_reward_model"
    config.reward_options.lm_reward_model = {"path": "<reward_model workdir or bundle folder>"}

The model is the bundle `reward_model.{msgpack,json}` that `configs/reward_model.py`
(rft.train.reward_model) writes in its workdir; it scores prompt + completion
(rft.reward_models.model). Text-reward interface (rft.rewards.text):

    reward(completions: list[str], targets) -> scores [N] float32

The prompt of each completion comes from `targets`: a mapping holding "prompts" (one per
completion; other keys, e.g. "answers", are ignored). With `prompt_in_completion=True`
the completions are whole texts (prompt + response) and `targets` is ignored. A plain
list of target answers (what the LM loop passes today) is an error: the reward model
needs the prompts. A host reward (the scores are not differentiated).

    config.reward = "shapes_preference"
    config.reward_options.shapes_preference = {"path": "<reward_model workdir, :shapes>"}
    # default: the shipped seed-0 model, "assets/shapes_preference/seed0" (seeds 0, 1, 2)

The bundle `shapes_rm.{msgpack,json}` that `configs/reward_model.py:shapes` writes: a
caption-conditioned image scorer trained from preference pairs or ratings of renders
(rft.reward_models.image_model). Image-reward interface (rft.rewards.base): a jax
function of the images [B, 16, 16, 3] and prompts["tokens"], differentiable (reward
backprop, ReNO), its weights passed as the reward's params. Its scale is the model's
(BT scores are logits of preference; a regression model's are ratings).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rft.rewards.base import Reward, register
from rft.rewards.text import prompts_of


@register("lm_reward_model")
def lm_reward_model(path: str = "", prompt_in_completion: bool = False,
                    batch_size: int = 256) -> Reward:
  """Scores of the reward model saved in `path` (see the module docstring)."""
  if not path:
    raise ValueError("config.reward_options.lm_reward_model.path is not set: give the "
                     "workdir of a configs/reward_model.py run (or a folder holding "
                     "reward_model.msgpack and reward_model.json)")
  from rft.reward_models import model as rm  # pylint: disable=g-import-not-at-top
  loaded = rm.load(path)
  loaded.batch_size = int(batch_size)

  def fn(completions: Sequence[str], targets=None) -> np.ndarray:
    completions = [str(c) for c in completions]
    if prompt_in_completion:
      prompts = [""] * len(completions)
    else:
      prompts = prompts_of(
          targets, len(completions), f"lm_reward_model ({path})",
          hint="; or set config.reward_options.lm_reward_model.prompt_in_completion=True "
               "and pass whole texts")
    return np.asarray(loaded.score(prompts, completions), np.float32)

  return Reward("lm_reward_model", fn, differentiable=False, host=True)


@register("shapes_preference")
def shapes_preference(path: str = "assets/shapes_preference/seed0",
                      standardize: bool = False) -> Reward:
  """Score of the ShapesWorld reward model saved in `path` (see the module docstring);
  by default the shipped seed-0 model (rft/assets/shapes_preference/seed0). With
  `standardize`, (r − mean) / std by the bundle's `score_stats` (its scores on clean
  held-out evaluation pairs, rft.train.reward_model.reference_score_stats): a
  Bradley–Terry model is defined up to an offset, so ensemble members of different
  seeds compare only when standardised."""
  if not path:
    raise ValueError("config.reward_options.shapes_preference.path is not set: give the "
                     "workdir of a configs/reward_model.py:shapes run (or a folder holding "
                     "shapes_rm.msgpack and shapes_rm.json)")
  from rft.reward_models import image_model  # pylint: disable=g-import-not-at-top
  loaded = image_model.load(path)

  shift, scale = 0.0, 1.0
  if standardize:
    stats = loaded.meta.get("score_stats")
    if not stats:
      raise ValueError(f"shapes_preference.standardize: the bundle in {path!r} has no "
                       "score_stats (written by configs/reward_model.py:shapes runs since "
                       "they were added; rerun the training to get them)")
    shift, scale = float(stats["mean"]), float(stats["std"])

  def fn(images, prompts, params):
    if "tokens" not in prompts:
      raise ValueError("shapes_preference needs prompts['tokens'] (ShapesWorld caption "
                       "tokens), got keys " + str(sorted(prompts)))
    return (loaded.score(images, prompts["tokens"], params) - shift) / scale

  return Reward("shapes_preference", fn, differentiable=True, params=loaded.params)
