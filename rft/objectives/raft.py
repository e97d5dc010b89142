"""RAFT: reward-ranked finetuning (Dong et al., TMLR 2023).

Each epoch samples k images per prompt from the current model, keeps the `keep` best
by reward, and finetunes on the kept (image, prompt) pairs with the ordinary denoising
loss (rft.diffusion.training.eps_loss): supervised learning on the model's own
best-of-k samples, no log-probs, no reward gradients.
"""
from __future__ import annotations

import numpy as np


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
