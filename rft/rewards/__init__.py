"""Rewards for the online loop: see rft.rewards.base for the interface."""


def ensure_registered():
  """Import every reward module so that each registers its factories."""
  from rft.rewards import shapes_alignment  # noqa: F401
