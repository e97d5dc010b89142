"""Config helpers shared by the files in configs/ (ml_collections ConfigDicts)."""
from __future__ import annotations

from ml_collections import config_dict


def parse_arg(arg: str | None, variants: tuple[str, ...]) -> set[str]:
  """Split a config argument like "smoke" or "sd14,smoke" into known variant names.

  An unknown name is an error listing the valid ones.
  """
  names = {a for a in (arg or "").split(",") if a}
  unknown = names - set(variants)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; valid: {sorted(variants)}")
  return names


def lock(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Lock a config so that a new key (e.g. a typo in --config.key=value) is an error."""
  config.lock()
  return config
