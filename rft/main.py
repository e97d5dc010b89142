"""rft's entry point: python -m rft.main --config=configs/<file>.py[:arg] [--workdir=DIR].

--config is a path to a config file, or the name of a config shipped with rft
(`--config=prdp.py:smoke`, `prdp:smoke` and `configs/prdp.py:smoke` work from any
directory, also with rft installed from a wheel; rft.config.resolve). The config file's
`get_config(arg)` builds a locked ml_collections ConfigDict; any key can be overridden
with --config.key=value (an unknown key or a wrong type is an error naming the key).
`config.trainer` names the training program that runs.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rft import checkpoint, distributed, placement, training
from rft import config as config_lib


class _ResolvingParser(flags.ArgumentParser):
  """Wraps ml_collections' config file parser so that it is given the file
  rft.config.resolve finds: the path as it is when it exists, else the shipped config of
  that name. An unknown name is a flag error that lists the shipped configs."""

  def __init__(self, inner: flags.ArgumentParser):
    self._inner = inner

  def parse(self, argument):
    file, sep, arg = argument.partition(":")
    try:
      file = config_lib.resolve(file)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from e  # absl reports a ValueError as a flag error
    return self._inner.parse(file + sep + arg)

  def flag_type(self):
    return self._inner.flag_type()


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: a path, or a shipped config by name "
    "(configs/<name>.py[:arg], <name>.py[:arg] or <name>[:arg]).", lock_config=True)
flags.FLAGS["config"].parser = _ResolvingParser(flags.FLAGS["config"].parser)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs "
                               "(default: workdirs/<config name>[_<arg>]).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose checkpoints were made with a "
    "different config (rft.run_record: without it that is an error naming each changed key).")
_RESUME_STEP = flags.DEFINE_integer(
    "resume_step", None, "Resume from this checkpoint step instead of the latest (e.g. the "
    "intact one a damaged-checkpoint error offers): later steps are moved to "
    "<workdir>/checkpoints_set_aside/, nothing is deleted.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Multi-process JAX (rft.distributed): on, off, or auto (from "
                                 "RFT_COORDINATOR/..., SLURM srun or TPU pod variables).")

# config.trainer -> "module:function" (rft.training: the same as a Python call).
TRAINERS = training.TRAINERS
resolve_trainer = training.resolve_trainer


def default_workdir(config_arg: str) -> str:
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", name + (f"_{arg.replace(',', '_')}" if arg else ""))


# --config.reward_options.NAME.KEY=VALUE may name a reward or key the config file did not
# define (the locked config would refuse it): run() takes them out of argv and main()
# applies them with rft.config.set_reward_options.
_REWARD_OPTIONS_FLAG = "--config.reward_options."
_reward_option_overrides: list[str] = []


def split_reward_options(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without the --config.reward_options.* flags, their "NAME.KEY=VALUE" parts)."""
  rest, options = [], []
  for a in argv:
    for prefix in (_REWARD_OPTIONS_FLAG, "-" + _REWARD_OPTIONS_FLAG[2:]):
      if a.startswith(prefix):
        options.append(a[len(prefix):])
        break
    else:
      rest.append(a)
  return rest, options


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _reward_option_overrides:
    config_lib.set_reward_options(config, _reward_option_overrides)
  placement.split_cpu(config.get("cpu_devices", 0))  # before JAX starts its CPU backend
  info = distributed.initialize(_DISTRIBUTED.value)  # before anything touches jax devices
  if info.process_index != 0:  # one log per job: the others report warnings and errors only
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  logging.info("config %s, workdir %s (the whole config: config.json there)",
               config_flags.get_config_filename(flags.FLAGS["config"]), workdir)
  # Every process checks (a changed config fails everywhere, no process is left waiting);
  # process 0 records.
  train = training.prepare(config, workdir, allow_config_change=_ALLOW_CHANGE.value,
                           write=info.process_index == 0)
  if _RESUME_STEP.value is not None:
    ckdir = os.path.join(workdir, "checkpoints")
    if info.process_index == 0:
      moved = checkpoint.set_aside_after(ckdir, _RESUME_STEP.value)
      logging.warning("--resume_step=%d: set aside %s", _RESUME_STEP.value, moved or "nothing")
    if info.process_count > 1:  # the others wait until the folders are moved
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("rft resume_step")
  train(config, workdir)


def check_config_flags(argv: list[str]) -> str | None:
  """A message for the first --config.KEY flag that names no key of the config file, or
  None. ml_collections would report it as a chain of KeyError / AttributeError
  tracebacks; rft's own flags (--workdir, ...) given as --config.KEY get a hint. A config
  that cannot be found or built is left to the flag parser, which reports it."""
  config_arg, keys = None, []
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      config_arg = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      config_arg = argv[i + 1]
    elif a.startswith(("--config.", "--noconfig.")):
      keys.append((a, a.split(".", 1)[1].split("=", 1)[0]))
  if not config_arg or not keys:
    return None
  try:
    config = config_lib.load(config_arg)
  except Exception:  # pylint: disable=broad-except
    return None
  for flag, key in keys:
    problem = config_lib.unknown_key(config, key)
    if problem:
      hint = (f" --{key} is a flag of rft.main, not a config key: pass --{key}=..."
              if key in ("workdir", "allow_config_change", "resume_step", "distributed")
              else "")
      return f"{flag}: in config {config_arg}, {problem}.{hint}"
  return None


def run():
  flags.mark_flag_as_required("config")
  sys.argv, _reward_option_overrides[:] = split_reward_options(sys.argv)
  problem = check_config_flags(sys.argv[1:])
  if problem:
    sys.exit(f"rft.main: {problem}")
  app.run(main)


if __name__ == "__main__":
  run()
