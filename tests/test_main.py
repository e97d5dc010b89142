"""The entry point: config files, overrides, locked keys, workdir errors, resume."""
import os

import numpy as np
import pytest

from rft import checkpoint, metrics, pretrained
from tests.helpers import run_main

SMOKE = "configs/pretrain_shapes.py:smoke"


def test_every_config_file_has_command_docstring_and_smoke():
  import ast
  from rft import config as config_lib
  configs = [f"{name}.py" for name in config_lib.shipped_configs()]
  assert configs
  # every other .py file of configs/ holds shared helpers (common.py), no get_config
  helpers = set(f for f in os.listdir(config_lib.CONFIG_DIR) if f.endswith(".py")) - set(configs)
  assert helpers == {"common.py"}, helpers
  for f in configs:
    path = os.path.join(config_lib.CONFIG_DIR, f)
    doc = ast.get_docstring(ast.parse(open(path).read()))
    assert "COMMAND" in doc and "EXPECTED" in doc, f
    assert config_lib.load(path, "smoke").is_locked, f
    with pytest.raises(ValueError, match="unknown config argument"):
      config_lib.load(path, "no_such_variant")


def test_pretrain_smoke_writes_events_checkpoint_and_bundle(tmp_path):
  p = run_main(SMOKE, tmp_path)
  from tests.test_tensorboard_console import check_pretrain_smoke
  check_pretrain_smoke(p, tmp_path)  # hparams, lr, throughput, grids, console
  scalars = metrics.read_scalars(str(tmp_path))
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
  assert all(np.isfinite(v) for _, v in scalars["train/loss"])
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 6
  meta = pretrained.load_meta("shapes_base", str(tmp_path))
  assert meta["steps"] == 6 and meta["model"]["channels"] == [16, 32, 32]
  # Continuing from that bundle with the high-noise emphasis runs and exports; a bundle
  # of another model (the shipped one) is an error naming config.init_dir.
  run_main(SMOKE, tmp_path / "cont", f"--config.init_dir={tmp_path}",
           "--config.high_noise.frac=0.5", "--config.high_noise.x0_weight_cap=50")
  cont = pretrained.load_meta("shapes_base", str(tmp_path / "cont"))
  assert cont["steps"] == 6
  from rft import config as config_lib
  from rft.train import pretrain
  bad = config_lib.load("pretrain_shapes", "smoke")
  bad.init_dir = "assets"
  with pytest.raises(ValueError, match="config.init_dir"):
    pretrain.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_unknown_key_and_wrong_type_are_errors_naming_the_key(tmp_path):
  p = run_main(SMOKE, tmp_path, "--config.no_such_key=3", check=False)
  assert p.returncode != 0 and "no_such_key" in p.stderr
  p = run_main(SMOKE, tmp_path, "--config.steps=abc", check=False)
  assert p.returncode != 0 and "steps" in p.stderr


def test_an_unknown_config_flag_names_the_key_the_closest_keys_and_rft_flags():
  """One line instead of ml_collections' KeyError / AttributeError tracebacks."""
  from rft import main as rft_main
  check = rft_main.check_config_flags
  msg = check(["--config=prdp.py:smoke", "--config.workdir=/tmp/x"])
  assert msg.startswith("--config.workdir=/tmp/x: in config prdp.py:smoke, there is no key "
                        "'workdir'") and "pass --workdir=..." in msg
  msg = check(["--config", "prdp", "--config.objective.clip_ep=1"])
  assert "no key 'objective.clip_ep' (closest: 'objective.clip_eps')" in msg
  assert "'lr' is a value (float), not a section" in check(["--config=prdp", "--config.lr.x=1"])
  assert "no key 'zzz'." in check(["--noconfig.zzz", "--config=prdp"])
  # known keys, reward_options entries (created from the command line), no config: no message
  assert check(["--config=prdp", "--config.objective.clip_eps=1", "--config.lr=1",
                "--config.reward_options.any.thing=3"]) is None
  assert check(["--config.lr=1"]) is None
  assert check(["--config=no_such_config", "--config.lr=1"]) is None  # the flag parser's


def test_unwritable_workdir_fails_before_work(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  p = run_main(SMOKE, blocker / "wd", check=False)
  assert p.returncode != 0 and "WorkdirError" in p.stderr and str(blocker / "wd") in p.stderr
  assert "pretrain:" not in p.stderr  # no training started


def test_resuming_with_a_changed_config_is_an_error_naming_the_keys(tmp_path):
  import json
  run_main(SMOKE, tmp_path, "--config.eval_every=0")
  changed = ("--config.eval_every=0", "--config.steps=8", "--config.model.text.width=48",
             "--config.lr=0.01")
  p = run_main(SMOKE, tmp_path, *changed, check=False)
  assert p.returncode != 0
  msg = p.stderr[p.stderr.index("holds checkpoints"):]
  assert "config.model.text.width: 32 (stored) -> 48 (now)" in msg
  assert "config.lr: " in msg and "-> 0.01 (now)" in msg
  assert "config.steps" not in msg.split("Keys that may")[0]  # extending is allowed
  assert "--allow_config_change" in msg
  # With the override the structural check still refuses the mismatched model: an error,
  # never a restart.
  p = run_main(SMOKE, tmp_path, *changed, "--allow_config_change", check=False)
  assert p.returncode != 0
  assert "CheckpointMismatchError" in p.stderr and "shape mismatch" in p.stderr
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 6
  # config.json stays the first run's; every start that got past the check is in the history.
  assert json.loads((tmp_path / "config.json").read_text())["model"]["text"]["width"] == 32
  history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [h["resumed"] for h in history] == [False, True]
  assert {"lr", "model.text.width", "steps"} <= set(history[1]["changed"])
  # Extending the run (a safe key) resumes it.
  run_main(SMOKE, tmp_path, "--config.eval_every=0", "--config.steps=8")
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 8


def test_base_model_falls_back_to_pretraining_when_absent(tmp_path, monkeypatch):
  """No shipped bundle: pretrain (smoke) into the workdir and load it."""
  import jax
  from rft import config as config_lib
  from rft.train import pretrain
  monkeypatch.setattr(pretrained, "ASSETS", str(tmp_path / "empty"))
  cfg = config_lib.load("pretrain_shapes", "smoke")
  with cfg.unlocked():
    cfg.eval_every = 0
  model, params, meta = pretrain.load_or_pretrain_base(str(tmp_path), None, cfg)
  assert meta["steps"] == 6 and pretrained.exists("shapes_base", str(tmp_path / "base_model"))
  assert model.channels == (16, 32, 32) and jax.tree.leaves(params)


def test_a_named_base_folder_without_a_bundle_is_an_error_not_a_pretraining(tmp_path):
  from rft.train import pretrain
  with pytest.raises(FileNotFoundError, match="shapes_base.msgpack"):
    pretrain.load_or_pretrain_base(str(tmp_path / "wd"), str(tmp_path / "typo"))
  assert not (tmp_path / "wd").exists()


def test_bundle_folder_names_resolve(tmp_path, monkeypatch):
  A = pretrained.ASSETS
  assert pretrained.resolve_dir(None) == pretrained.resolve_dir("") == A
  assert pretrained.resolve_dir("assets") == A
  assert pretrained.resolve_dir("assets/positions") == os.path.join(A, "positions")
  assert pretrained.resolve_dir(str(tmp_path)) == str(tmp_path)
  monkeypatch.chdir(tmp_path)  # a local folder named assets/<sub> wins over the shipped one
  (tmp_path / "assets" / "mine").mkdir(parents=True)
  assert pretrained.resolve_dir("assets/mine") == "assets/mine"


def test_missing_bundle_error_names_files_and_command(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pretrained.load_meta("shapes_base", str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / "shapes_base.msgpack") in msg and "configs/pretrain_shapes.py" in msg


def test_unknown_trainer_is_an_error_before_the_workdir_is_made(tmp_path):
  p = run_main(SMOKE, tmp_path / "wd", "--config.trainer=nope", check=False)
  assert p.returncode != 0 and "config.trainer='nope'" in p.stderr
  assert not (tmp_path / "wd").exists()


def test_the_python_api_trains_records_and_resumes_like_the_command(tmp_path):
  """rft.training.train is `python -m rft.main` as a call: it returns the results it writes,
  records config.json, resumes, refuses a meaning-changing config and an unknown trainer."""
  import json

  from rft import config as config_lib
  from rft import training

  def prdp(*overrides):
    return config_lib.apply_overrides(config_lib.load("prdp", "smoke"),
                                      ["eval_every=0", *overrides])
  results = training.train(prdp(), tmp_path / "run")
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["epochs"] == on_disk["epochs"] == 2
  assert results["reward_queries"] == on_disk["reward_queries"] > 0
  assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2
  assert training.train(prdp("epochs=3"), tmp_path / "run")["epochs"] == 3  # resumed
  assert checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints")).latest_step() == 3
  with pytest.raises(ValueError, match="config.lr"):
    training.train(prdp("epochs=3", "lr=0.01"), tmp_path / "run")
  with pytest.raises(ValueError, match="known: "):
    training.train(prdp("trainer=nope"), tmp_path / "other")
  assert not (tmp_path / "other").exists()


def test_reward_options_from_the_command_line_create_entries(tmp_path):
  """--config.reward_options.NAME.KEY=VALUE adds entries the config file lacks (JSON
  values, else strings), keeps an existing key's type, and a key the reward does not take
  fails at the reward's build, naming it, before any training."""
  from rft import config as config_lib
  from rft import main as main_lib
  from rft.rewards import base as rewards_base
  argv = ["rft.main", "--config=prdp.py:smoke",
          "--config.reward_options.shapes_alignment.shaping=par",
          "--config.reward_options.shapes_alignment.shaping_reference=[0.25, 0.5]",
          "--config.epochs=1"]
  rest, opts = main_lib.split_reward_options(argv)
  assert rest == ["rft.main", "--config=prdp.py:smoke", "--config.epochs=1"]
  config = config_lib.set_reward_options(config_lib.load("prdp", "smoke"), opts)
  assert config.reward_options.shapes_alignment.to_dict() == {
      "shaping": "par", "shaping_reference": [0.25, 0.5]}
  reward = rewards_base.build(config.reward, options=config.reward_options)
  assert reward.name == "shapes_alignment"  # shaped: PAR against the two references
  config_lib.set_reward_options(config, ["shapes_alignment.shaping_reference=[0.75]"])
  assert list(config.reward_options.shapes_alignment.shaping_reference) == [0.75]
  with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
    config_lib.set_reward_options(config, ["shapes_alignment=1"])
  p = run_main("configs/prdp.py:smoke", tmp_path / "wd",
               "--config.reward_options.shapes_alignment.no_such_option=1", check=False)
  assert p.returncode != 0
  assert "config.reward_options.shapes_alignment: unknown option(s) ['no_such_option']" in \
      p.stderr
