"""Config helpers shared by the files in configs/ (ml_collections ConfigDicts)."""
from __future__ import annotations

import importlib.util
import os

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


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name: str, arg: str | None = None) -> config_dict.ConfigDict:
  """get_config(arg) of configs/<name>.py (or of a path to a config file)."""
  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"rft_config_{os.path.basename(path)[:-3]}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


REQUIRED = "REQUIRED: "


def required(hint: str) -> str:
  """A placeholder for a value the user must pass (`check_required` rejects it), e.g.
  `c.model_path = required("--config.model_path=<HF model folder or hub id>")`."""
  return REQUIRED + hint


def check_required(config: config_dict.ConfigDict, prefix: str = "config") -> None:
  """ValueError naming every key still holding a `required(...)` placeholder."""
  missing = []

  def walk(node, path):
    for k, v in node.items():
      if isinstance(v, config_dict.ConfigDict):
        walk(v, f"{path}.{k}")
      elif isinstance(v, str) and v.startswith(REQUIRED):
        missing.append(f"{path}.{k} (pass {v[len(REQUIRED):]})")

  walk(config, prefix)
  if missing:
    raise ValueError("this config needs value(s) that were not given: " + "; ".join(missing))


def apply_overrides(config: config_dict.ConfigDict, overrides) -> config_dict.ConfigDict:
  """Set "a.b=value" strings on a config like --config.a.b=value does: the value is parsed
  as the existing key's type (bool: true/false/1/0). An unknown key is an error naming it."""
  for item in overrides or ():
    path, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      if p not in node or not isinstance(node[p], config_dict.ConfigDict):
        raise KeyError(f"override {item!r}: config has no section {p!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {item!r}: config has no key {path!r}")
    old = node[leaf]
    if isinstance(old, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"override {item!r}: {path} is a bool (true/false)")
      value = raw.lower() in ("true", "1")
    elif isinstance(old, int):
      value = int(raw)
    elif isinstance(old, float):
      value = float(raw)
    elif old is None or isinstance(old, str):
      value = raw
    else:
      raise ValueError(f"override {item!r}: cannot set a {type(old).__name__} from text")
    with node.ignore_type():
      node[leaf] = value
  return config
