"""What ran in a workdir: the config of every start, and the check that a resumed run
keeps the meaning of the one it continues.

`<workdir>/config.json` is the config of the run whose checkpoints the workdir holds: it
is written by the first start and never overwritten once a checkpoint exists.
`<workdir>/config_history.jsonl` gets one line per start: the time, the full config and
the keys that differ from config.json.

Resuming (a checkpoint exists) with a config that differs from config.json in a key that
changes what the run computes (objective, reward, batch shape, learning rate, model, ...)
is an error naming every such key with both values, unless the start passes
`--allow_config_change`. Keys that only say how long the run goes or how it reports
(RESUME_SAFE) may change: extending `epochs` continues the same run.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from rft import paths

# Keys whose change keeps the run's meaning: its length and its reporting cadence.
RESUME_SAFE = ("epochs", "steps", "eval_every", "ckpt_every", "log_every", "export_dir")

_MISSING = "<absent>"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
  out = {}
  for k, v in config.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_changes(stored: Mapping[str, Any], new: Mapping[str, Any],
                   safe: tuple[str, ...] = RESUME_SAFE) -> list[tuple[str, Any, Any]]:
  """(dotted key, stored value, new value) for every key whose value differs (a key on
  one side only shows `<absent>` on the other), leaving out the `safe` keys."""
  a, b = flatten(stored), flatten(new)
  return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
          if k not in safe and a.get(k, _MISSING) != b.get(k, _MISSING)]


def has_checkpoint(workdir: str) -> bool:
  """Whether any trainer's checkpoint folder (`checkpoints*`) in workdir holds a step."""
  root = paths.path(workdir)
  if not root.is_dir():
    return False
  for entry in root.iterdir():
    if entry.name.startswith("checkpoints") and entry.is_dir() and any(entry.iterdir()):
      return True
  return False


def check_and_record(workdir: str, config_json: str, allow_change: bool = False,
                     write: bool = True) -> list[tuple[str, Any, Any]]:
  """Compare this start's config (JSON text) with the workdir's config.json when resuming,
  then (with `write`: one process of a job) record it. Returns the keys that changed
  since the checkpointed run (safe ones included; [] for a fresh start); raises
  ValueError for meaning-changing ones unless `allow_change`."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config_json)
  resuming = paths.path(path).exists() and has_checkpoint(workdir)
  stored = None
  if resuming or (write and paths.path(path).exists()):  # a fresh start's readers would
    stored = paths.read_json(path)                       # race the writer: only it reads
  changed = config_changes(stored, new, safe=()) if stored is not None else []
  if resuming and not allow_change:
    bad = [c for c in changed if c[0] not in RESUME_SAFE]
    if bad:
      lines = "\n".join(f"  config.{k}: {json.dumps(a)} (stored) -> {json.dumps(b)} (now)"
                        for k, a, b in bad)
      raise ValueError(
          f"{workdir} holds checkpoints of a run with a different config ({path}):\n{lines}\n"
          "Resuming would mix two runs. Use a new --workdir, or pass --allow_config_change "
          "to continue with the new values (both configs stay in "
          f"{os.path.join(workdir, 'config_history.jsonl')}). Keys that may change freely: "
          f"{', '.join(RESUME_SAFE)}.")
  if write:
    if not resuming:  # nothing computed yet under the stored config: this start defines it
      paths.write_text(path, config_json)
    paths.append_text(os.path.join(workdir, "config_history.jsonl"), json.dumps(
        {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": resuming,
         "changed": [k for k, _, _ in changed], "config": new}) + "\n")
  return changed if resuming else []
