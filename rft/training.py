"""Run a config's training program from Python: what `python -m rft.main` does, as a call.

    from rft import config as config_lib, training
    config = config_lib.load("prdp", "smoke")                # configs/prdp.py:smoke
    config = config_lib.apply_overrides(config, ["epochs=4", "lr=1e-4"])
    results = training.train(config, "/tmp/prdp_smoke")      # also written to results.json

`config.trainer` names the program (TRAINERS: pretraining, scorers, the diffusion RL
loop, ReNO, LM pretraining, the LM RL loop); each takes (config, workdir) and returns
the results dict it writes to `<workdir>/results.json`. A workdir that holds checkpoints
is resumed from the latest one. Single process: multi-process jobs start through
`python -m rft.main` (rft.distributed).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from absl import logging
from ml_collections import config_dict

from rft import checkpoint, placement, run_record
from rft import config as config_lib

# config.trainer -> "module:function"; each takes (config, workdir).
TRAINERS = {
    "pretrain_shapes": "rft.train.pretrain:train_and_evaluate",
    "train_scorers": "rft.train.scorers:train_and_evaluate",
    "diffusion_rl": "rft.train.diffusion_rl:train_and_evaluate",  # PRDP, DDPO, DRaFT, AlignProp, RAFT
    "reno": "rft.train.reno:run",  # inference-time noise optimisation
    "pretrain_arith": "rft.train.pretrain_lm:train_and_evaluate",
    "lm_rl": "rft.train.lm_rl:train_and_evaluate",  # GRPO, DAPO, Dr.GRPO, GSPO, RLOO, RAFT
    "reward_model": "rft.train.reward_model:train_and_evaluate",  # BT / regression from pairs, ratings
}


def resolve_trainer(name: str):
  """The training function registered for `config.trainer`; an unknown name is an error
  listing the known ones."""
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not a trainer; known: {sorted(TRAINERS)}")
  module, fn = TRAINERS[name].split(":")
  return getattr(importlib.import_module(module), fn)


def prepare(config: config_dict.ConfigDict, workdir: str, *, allow_config_change: bool = False,
            write: bool = True):
  """Everything before training, in the order that loses nothing: the trainer exists, the
  config's values are in range, the workdir is writable, and its config.json agrees with
  `config` when resuming (a meaning-changing difference is an error naming each key unless
  `allow_config_change`). `write`: this process records config.json (one per job).
  Returns the training function."""
  train_fn = resolve_trainer(config.trainer)
  config_lib.check_ranges(config)  # counts, rates, probabilities: before any work
  checkpoint.ensure_workdir(workdir)  # fail before any work
  changed = run_record.check_and_record(workdir, config.to_json_best_effort(indent=2),
                                        allow_config_change, write=write)
  if changed:
    logging.warning("resuming with changed config keys (config_history.jsonl): %s",
                    ", ".join(k for k, _, _ in changed))
  return train_fn


def train(config: config_dict.ConfigDict, workdir: str | os.PathLike, *,
          allow_config_change: bool = False) -> Any:
  """Train `config` in `workdir` (created if missing; resumed if it holds checkpoints) and
  return the trainer's results (as written to results.json).

  `config.cpu_devices` splits the CPU into that many XLA devices only if JAX has not
  started yet in this process (otherwise the devices JAX already has are used, with a
  warning); `python -m rft.main` always applies it."""
  workdir = os.fspath(workdir)
  if config.get("cpu_devices", 0):
    try:
      placement.split_cpu(config.cpu_devices)
    except RuntimeError:  # JAX's backends already started in this process
      logging.warning("config.cpu_devices=%d ignored: JAX has already started in this "
                      "process; running on its devices", config.cpu_devices)
  return prepare(config, workdir, allow_config_change=allow_config_change)(config, workdir)
