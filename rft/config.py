"""Config helpers shared by the files in configs/ (ml_collections ConfigDicts)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
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


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The config files live in configs/ at the repository root: a checkout, or an editable
# install of one, reads them there. A wheel (setup.py maps configs/ to the package
# rft.configs) installs the same files as rft/configs/, which a checkout never has.
PACKAGED_CONFIG_DIR = os.path.join(_PACKAGE_DIR, "configs")
CHECKOUT_CONFIG_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")
CONFIG_DIR = PACKAGED_CONFIG_DIR if os.path.isdir(PACKAGED_CONFIG_DIR) else CHECKOUT_CONFIG_DIR


def shipped_configs() -> list[str]:
  """Names (without .py) of the config files that come with rft, sorted: the files of
  CONFIG_DIR that define get_config (common.py holds the helpers they share)."""
  if not os.path.isdir(CONFIG_DIR):
    return []

  def is_config(f):
    with open(os.path.join(CONFIG_DIR, f), encoding="utf-8") as fh:
      return "\ndef get_config(" in fh.read()
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_") and is_config(f))


def resolve(path: str) -> str:
  """The config file that `path` (the part of --config before ':') names.

  A path to an existing file is returned as it is, so a file in the working directory
  wins. Otherwise `path` names a shipped config: "prdp", "prdp.py", "configs/prdp" or
  "configs/prdp.py" -> CONFIG_DIR/prdp.py, which works from any directory, also with rft
  installed from a wheel. Anything else is a FileNotFoundError listing the shipped names.
  """
  if os.path.isfile(path):
    return path
  head, base = os.path.split(os.path.normpath(path)) if path else ("", "")
  name = base[:-3] if base.endswith(".py") else base
  names = shipped_configs()
  if head in ("", "configs") and name in names:
    return os.path.join(CONFIG_DIR, f"{name}.py")
  raise FileNotFoundError(
      f"config {path!r} is neither a file nor a config shipped with rft; shipped configs "
      f"(pass e.g. --config=prdp.py:smoke): {', '.join(names) or 'none found'} "
      f"(in {CONFIG_DIR})")


def load(name: str, arg: str | None = None) -> config_dict.ConfigDict:
  """get_config(arg) of a config file: a path, or a shipped config by name (see
  `resolve`: "prdp", "prdp.py", "configs/prdp.py"). With `arg` None, a name such as
  "prdp:smoke" carries its argument after the colon, as --config does."""
  if arg is None and ":" in name and not os.path.isfile(name):
    name, _, arg = name.partition(":")
  path = resolve(name)
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


def unknown_key(config: config_dict.ConfigDict, path: str) -> str | None:
  """None when `path` ("a.b.c") names a key of `config`, else a message naming the first
  missing part and the closest keys. reward_options entries may be created from the
  command line (set_reward_options), so any path under it passes."""
  import difflib  # pylint: disable=g-import-not-at-top
  parts = path.split(".")
  if parts[0] == "reward_options" and len(parts) > 1:
    return None
  node, done = config, []
  for p in parts:
    if not isinstance(node, config_dict.ConfigDict):
      return f"{'.'.join(done)!r} is a value ({type(node).__name__}), not a section"
    if p not in node:
      near = difflib.get_close_matches(p, list(node.keys()), n=3, cutoff=0.6)
      return (f"there is no key {'.'.join(done + [p])!r}" +
              (f" (closest: {', '.join(repr('.'.join(done + [n])) for n in near)})"
               if near else ""))
    node, done = node[p], done + [p]
  return None


def _literal(raw: str):
  """A command-line value with no existing key to take its type from: JSON (numbers,
  true / false, null, lists, objects), else the string itself."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    return raw


def set_reward_options(config: config_dict.ConfigDict, overrides) -> config_dict.ConfigDict:
  """Apply "name.key=value" strings (from --config.reward_options.name.key=value) to
  config.reward_options, creating the reward's entry and the key when the config file did
  not define them (a value then parses as JSON, else stays a string). An existing key keeps
  its type, as any override does. Whether the reward takes the option is checked when the
  reward is built (rft.rewards.base.build_term names it)."""
  if "reward_options" not in config:
    raise KeyError(f"--config.reward_options.{overrides[0]}: this config has no "
                   f"reward_options (its trainer takes no reward options)")
  opts = config.reward_options
  for item in overrides:
    path, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"--config.reward_options.{item}: give the value with '=' "
                       f"(--config.reward_options.NAME.KEY=VALUE)")
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
      raise ValueError(f"--config.reward_options.{item}: expected NAME.KEY=VALUE")
    name, keys = parts[0], parts[1:]
    with opts.unlocked():
      if name not in opts:
        opts[name] = config_dict.ConfigDict()
      node = opts[name]
      for k in keys[:-1]:
        if k not in node:
          node[k] = config_dict.ConfigDict()
        node = node[k]
      old = node.get(keys[-1]) if keys[-1] in node else None
      if isinstance(old, (bool, int, float, str)):
        apply_overrides(node, [f"{keys[-1]}={raw}"])  # keeps the file's type
      else:  # new, None, or a list / mapping: a JSON value
        with node.ignore_type():
          node[keys[-1]] = _literal(raw)
  return config


# --------------------------------------------------------------------------- value ranges

@dataclasses.dataclass(frozen=True)
class Range:
  """Allowed values of a numeric key: [low, high] (open at an end when `*_open`)."""
  low: float | None = None
  high: float | None = None
  integer: bool = False
  low_open: bool = False
  high_open: bool = False

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
    hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
    return f"{kind} {' and '.join(x for x in (lo, hi) if x)}".strip()

  def holds(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if self.integer and v != int(v):
      return False
    if self.low is not None and (v <= self.low if self.low_open else v < self.low):
      return False
    if self.high is not None and (v >= self.high if self.high_open else v > self.high):
      return False
    return True


_COUNT, _CADENCE = Range(1, integer=True), Range(0, integer=True)
_PROB = Range(0.0, 1.0)
# Keys with one meaning in every config that has them (a key a config lacks is skipped).
RANGES: dict[str, Range] = {
    **{k: _COUNT for k in (
        "epochs", "steps", "prompts_per_epoch", "samples_per_prompt", "prompts_per_update",
        "updates_per_epoch", "batch_size", "eval_batch_size", "eval_prompts",
        "eval_samples_per_prompt", "prompts_per_step", "group_size", "minibatches",
        "sampler.num_steps", "sampling.max_new_tokens")},
    **{k: _CADENCE for k in (
        "eval_every", "ckpt_every", "log_every", "warmup", "train_prompts", "cpu_devices")},
    "lr": Range(0.0, low_open=True),
    "sampler.eta": Range(0.0), "sampler.guidance_scale": Range(0.0),
    "sampling.temperature": Range(0.0), "sampling.top_p": Range(0.0, 1.0, low_open=True),
    "grad_clip": Range(0.0), "weight_decay": Range(0.0), "max_param_norm_ratio": Range(0.0),
    "cond_dropout": _PROB, "holdout_fraction": Range(0.0, 1.0, high_open=True),
    "ema_decay": Range(0.0, 1.0, high_open=True),
    "objective.timestep_fraction": Range(0.0, 1.0, low_open=True),
}


def check_ranges(config: config_dict.ConfigDict, ranges: dict[str, Range] = RANGES) -> None:
  """ValueError naming every key (as --config.<key>) whose value is outside its range,
  not a number, or not finite; run before any work."""
  bad = []
  for key, rule in ranges.items():
    node = config
    for part in key.split("."):
      node = node.get(part) if isinstance(node, (config_dict.ConfigDict, dict)) else None
      if node is None:
        break
    if node is not None and not rule.holds(node):
      bad.append(f"--config.{key}={node!r} (must be {rule.describe()})")
  if bad:
    raise ValueError("config value(s) out of range: " + "; ".join(bad))
