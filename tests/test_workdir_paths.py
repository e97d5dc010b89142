"""Workdirs on a non-local filesystem (`--workdir=gs://...`): every file rft writes or reads
in a workdir goes through rft.paths (etils.epath).

The filesystem is tests/remote_fs.py's `fakeremote://` scheme, stored under a temporary
folder. The smoke runs start in an empty working directory: a plain `open()` or
`os.makedirs()` on a workdir path would leave a `fakeremote:` folder (or any other file)
there, and `os.path.exists()` on one would see nothing, so a resume would start over.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import remote_fs
from tests.helpers import JAX_CACHE, ROOT, xla_flags


@pytest.fixture
def remote(tmp_path):
  """(uri of a fresh remote folder, where it is stored locally)."""
  root = str(tmp_path / "store")
  remote_fs.install(root)
  return "fakeremote://bucket/run", os.path.join(root, "bucket", "run")


def _files(folder: str) -> set:
  return {os.path.relpath(os.path.join(d, f), folder)
          for d, _, files in os.walk(folder) for f in files}


def _run_main(config: str, workdir: str, root: str, cwd: str, *overrides: str) -> str:
  """rft.main with the fake scheme installed (root: its storage), started in `cwd`; the log."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", XLA_FLAGS=xla_flags(),
             **{remote_fs.ENV: root})
  p = subprocess.run([sys.executable, "-m", "tests.remote_fs",
                      f"--config={os.path.join(ROOT, 'configs', config)}",
                      f"--workdir={workdir}", *overrides],
                     cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, f"{config} failed ({p.returncode}):\n{p.stderr[-4000:]}"
  return p.stderr


def _cwd(tmp_path) -> str:
  d = tmp_path / "cwd"
  d.mkdir()
  return str(d)


# ------------------------------------------------------------------ the pieces, in process


def test_paths_write_read_append_and_png_on_a_remote_folder(remote, tmp_path, monkeypatch):
  from PIL import Image
  from rft import paths
  uri, local = remote
  monkeypatch.chdir(_cwd(tmp_path))
  paths.write_json(f"{uri}/a/b.json", {"x": 1}, indent=1)
  assert paths.read_json(f"{uri}/a/b.json") == {"x": 1}
  assert open(os.path.join(local, "a", "b.json")).read() == '{\n "x": 1\n}'
  paths.append_text(f"{uri}/log.jsonl", "1\n")  # the scheme has no append mode
  paths.append_text(f"{uri}/log.jsonl", "2\n")
  assert open(os.path.join(local, "log.jsonl")).read() == "1\n2\n"
  paths.write_png(f"{uri}/img/x.png", np.full((4, 5, 3), 200, np.uint8))
  assert Image.open(os.path.join(local, "img", "x.png")).size == (5, 4)
  assert _files(local) == {"a/b.json", "log.jsonl", "img/x.png"}
  assert os.listdir(".") == []
  with pytest.raises(FileNotFoundError):  # what a plain os call sees of a remote path
    open(f"{uri}/a/b.json")


def test_paths_local_writes_replace_whole_files(tmp_path):
  from rft import paths
  target = tmp_path / "sub" / "r.json"
  paths.write_json(str(target), [1, 2])
  paths.write_json(str(target), {"k": "v"}, indent=1)
  assert json.loads(target.read_text()) == {"k": "v"}
  assert os.listdir(tmp_path / "sub") == ["r.json"]  # no temporary file left
  paths.append_text(str(tmp_path / "h.jsonl"), "a\n")
  paths.append_text(str(tmp_path / "h.jsonl"), "b\n")
  assert (tmp_path / "h.jsonl").read_text() == "a\nb\n"


def test_a_write_killed_before_its_rename_leaves_no_file_read_as_events(tmp_path,
                                                                        monkeypatch):
  """A rewrite of an event file (tb_events.trim_after) interrupted between the write and
  the rename leaves the old file and a temporary one whose name TensorBoard and tb_events
  do not read as events (they read any name containing "tfevents")."""
  from etils import epath

  from rft import paths, tb_events
  target = tmp_path / "events.out.tfevents.1.host"
  paths.write_bytes(str(target), b"old")

  def killed(self, *a, **k):
    raise KeyboardInterrupt("killed before the rename")
  monkeypatch.setattr(type(epath.Path(str(tmp_path))), "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    paths.write_bytes(str(target), b"new")
  left = sorted(os.listdir(tmp_path))
  assert len(left) == 2 and target.read_bytes() == b"old"
  assert [n for n in left if "tfevents" in n] == [target.name]
  assert tb_events._event_files(str(tmp_path)) == [str(target)]


def test_tensorboard_events_on_a_remote_logdir_flush_and_trim(remote, tmp_path, monkeypatch):
  from rft import metrics, tb_events
  uri, local = remote
  monkeypatch.chdir(_cwd(tmp_path))
  w = metrics.TensorBoardWriter(uri)
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": float(step)})
  w.write_images(3, {"img": np.zeros((4, 4, 3), np.uint8)})
  w.flush()  # flush() means stored: readable before close
  assert [s for s, _ in metrics.read_scalars(uri)["loss"]] == [1, 2, 3]
  w.close()
  assert tb_events.trim_after(uri, 2) == {os.listdir(local)[0]: 2}  # step 3's scalar, image
  assert metrics.read_scalars(uri)["loss"] == [(1, 1.0), (2, 2.0)]
  assert len(os.listdir(local)) == 1 and os.listdir(".") == []


def test_checkpoints_params_files_and_set_aside_on_a_remote_folder(remote, tmp_path,
                                                                     monkeypatch):
  import jax.numpy as jnp
  from rft import checkpoint
  uri, local = remote
  monkeypatch.chdir(_cwd(tmp_path))
  ck = checkpoint.Checkpointer(f"{uri}/checkpoints", max_to_keep=3)
  for step in (1, 2, 3):
    ck.save(step, {"w": jnp.full((3,), float(step))}, {"step": step})
  moved = checkpoint.set_aside_after(f"{uri}/checkpoints", 1)
  assert moved == [f"{uri}/checkpoints_set_aside/2", f"{uri}/checkpoints_set_aside/3"]
  assert sorted(os.listdir(os.path.join(local, "checkpoints_set_aside"))) == ["2", "3"]
  state, meta = checkpoint.Checkpointer(f"{uri}/checkpoints").restore({"w": jnp.zeros(3)})
  assert meta == {"step": 1} and float(state["w"][0]) == 1.0
  checkpoint.save_params_file(f"{uri}/p.msgpack", {"a": np.arange(3.0)})
  assert checkpoint.load_params_file(f"{uri}/p.msgpack")["a"].tolist() == [0.0, 1.0, 2.0]
  assert os.listdir(".") == []


def test_hf_export_on_a_remote_workdir(remote, tmp_path, monkeypatch):
  import jax
  from safetensors.numpy import load
  from rft.models.lm import DecoderLM, LMConfig
  from rft.train import lm_rl
  uri, local = remote
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "tokenizer.json").write_text('{"t": 1}')
  monkeypatch.chdir(_cwd(tmp_path))
  cfg = LMConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                 num_heads=2, num_kv_heads=1)
  dummy = jax.numpy.zeros((1, 4), jax.numpy.int32)
  params = DecoderLM(cfg).init(jax.random.key(0), dummy, dummy,
                               jax.numpy.ones((1, 4), bool))["params"]
  out = lm_rl.export_hf(uri, cfg, params, str(model_dir), {"objective": "grpo"})
  assert out == f"{uri}/hf_model"
  files = _files(os.path.join(local, "hf_model"))
  assert files == {"config.json", "model.safetensors", "tokenizer.json", "rft_meta.json"}
  with open(os.path.join(local, "hf_model", "model.safetensors"), "rb") as f:
    assert load(f.read())  # a whole safetensors file
  assert os.listdir(".") == []


# ------------------------------------------------------------------ whole runs


def test_prdp_smoke_on_a_remote_workdir_and_its_resume(remote, tmp_path):
  from PIL import Image
  from rft import metrics
  uri, local = remote
  cwd = _cwd(tmp_path)
  _run_main("prdp.py:smoke", uri, os.path.dirname(os.path.dirname(local)), cwd)
  files = _files(local)
  assert {"config.json", "config_history.jsonl", "results.json", "shapes_base.msgpack",
          "shapes_base.json", "samples/train_epoch0000.png",
          "samples/heldout_epoch0002.png"} <= files, files
  assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"1", "2"}
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert Image.open(os.path.join(local, "samples", "train_epoch0002.png")).format == "PNG"
  results = json.load(open(os.path.join(local, "results.json")))
  assert sorted(results["history"]) == ["0", "2"]
  scalars = metrics.read_scalars(uri)
  assert [s for s, _ in scalars["eval/train/alignment"]] == [0, 2]
  assert [s for s, _ in scalars["train/loss"]] == [1, 2]
  assert os.listdir(cwd) == []
  bundle = open(os.path.join(local, "shapes_base.msgpack"), "rb").read()
  # Resume from epoch 1 (epoch 2 is set aside), as after a damaged checkpoint: config.json
  # is read back, epoch 2 runs again and logs again (trimmed first), the same model results.
  log = _run_main("prdp.py:smoke", uri, os.path.dirname(os.path.dirname(local)), cwd,
                  "--resume_step=1")
  assert "set aside" in log and "resumed" in log
  assert os.listdir(os.path.join(local, "checkpoints_set_aside")) == ["2"]
  assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["1", "2"]
  history = [json.loads(x) for x in open(os.path.join(local, "config_history.jsonl"))]
  assert [h["resumed"] for h in history] == [False, True]
  again = metrics.read_scalars(uri)  # epoch 2 once, logged by the resumed run
  assert [s for s, _ in again["eval/train/alignment"]] == [0, 2]
  assert again["train/loss"] == scalars["train/loss"]
  assert open(os.path.join(local, "shapes_base.msgpack"), "rb").read() == bundle
  assert os.listdir(cwd) == []


def test_grpo_and_pretraining_smokes_on_remote_workdirs(remote, tmp_path):
  from rft import metrics
  uri, local = remote
  root = os.path.dirname(os.path.dirname(local))
  cwd = _cwd(tmp_path)
  _run_main("grpo.py:smoke", uri + "/grpo", root, cwd)
  files = _files(os.path.join(local, "grpo"))
  assert {"config.json", "config_history.jsonl", "results.json", "arith_base.msgpack",
          "arith_base.json"} <= files, files
  assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"1", "2"}
  assert metrics.read_scalars(uri + "/grpo")
  _run_main("pretrain_shapes.py:smoke", uri + "/pretrain", root, cwd)
  files = _files(os.path.join(local, "pretrain"))
  assert {"config.json", "shapes_base.msgpack", "shapes_base.json"} <= files, files
  assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"3", "6"}
  assert [s for s, _ in metrics.read_scalars(uri + "/pretrain")["train/loss"]] == [2, 4, 6]
  assert os.listdir(cwd) == []
