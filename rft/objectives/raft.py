"""RAFT: reward-ranked finetuning (Dong et al., TMLR 2023).

Each epoch samples k images per prompt from the current model, keeps the `keep` best
by reward, and finetunes on the kept (image, prompt) pairs with the ordinary denoising
loss (rft.diffusion.training.eps_loss): supervised learning on the model's own
best-of-k samples, no log-probs, no reward gradients.
"""
from __future__ import annotations

import numpy as np

from rft.diffusion import training
from rft.objectives import registry


def select_top(rewards: np.ndarray, group_size: int, keep: int) -> np.ndarray:
  """Flat indices of the `keep` highest-reward samples of every group, best first.

  rewards [n] ordered by prompt (group_size consecutive samples per prompt). Ties go to
  the earlier sample.
  """
  rewards = np.asarray(rewards)
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of {group_size}")
  if not 1 <= keep <= group_size:
    raise ValueError(f"keep={keep} must be in [1, group_size={group_size}]")
  groups = rewards.reshape(-1, group_size)
  order = np.argsort(-groups, axis=1, kind="stable")[:, :keep]
  return (order + np.arange(groups.shape[0])[:, None] * group_size).reshape(-1)


# ------------------------------------------------------------------------ registration


def _make_loss(config, pipe):
  o = config.objective

  def loss(params, b, key, **_):  # the samples' and reference params are not used
    return training.eps_loss(pipe.eps_fn, params, b["images"], b["cond"], b["null_cond"], key,
                             pipe.schedule, o.cond_dropout)

  return loss


def _prepare(config, ids, scores, step_values, stats):
  del ids, step_values, stats
  keep = select_top(scores, config.samples_per_prompt, config.objective.keep)
  return {"keep": keep}, {"kept_reward_mean": float(scores[keep].mean())}


def _check(config):
  keep, B = config.objective.keep, config.samples_per_prompt
  if not 1 <= keep <= B:
    raise ValueError(f"config.objective.keep={keep} must be in [1, config.samples_per_prompt="
                     f"{B}]")


registry.register_diffusion(registry.DiffusionObjective(
    name="raft", kind="select_sft",
    summary="denoising loss on the best `keep` of each prompt's samples (Dong et al. 2023)",
    make_loss=_make_loss, prepare=_prepare, check=_check,
    rows_per_prompt=lambda c: (c.objective.keep, "config.objective.keep")))
