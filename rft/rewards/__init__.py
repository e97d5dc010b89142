"""Rewards for the online loop: see rft.rewards.base for the interface."""
import importlib

# Every module that registers reward factories (rft.rewards.base.register).
REWARD_MODULES = ("shapes_alignment", "jpeg", "image_stats", "text", "clip_rewards", "aesthetic",
                  "ensemble", "reward_model", "lm_judge", "dense")


def ensure_registered():
  """Import every reward module so that each registers its factories."""
  for name in REWARD_MODULES:
    importlib.import_module(f"rft.rewards.{name}")
