"""Interruption and damage: SIGKILL / SIGTERM resume to the same params and curves,
TensorBoard points after the resumed checkpoint are dropped (every step once), a damaged
checkpoint is one clear error offering the newest intact one, --resume_step."""
import os
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from rft import checkpoint, metrics, tb_events
from rft.tools import kill_resume
from tests.helpers import JAX_CACHE, ROOT, run_main, xla_flags

SMOKE = "configs/pretrain_shapes.py:smoke"
ARGS = ["--config.eval_every=0", "--config.steps=20", "--config.ckpt_every=5",
        "--config.log_every=5"]


# ---------------------------------------------------------------- TensorBoard on resume

def _write(logdir, steps, tag="train/loss"):
  w = metrics.TensorBoardWriter(str(logdir))
  for s in steps:
    w.write_scalars(s, {tag: float(s) / 10})
  w.close()


def test_trim_after_drops_later_points_and_a_cut_short_record(tmp_path):
  _write(tmp_path, range(0, 11))
  (path,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
  with open(path, "ab") as f:  # a kill in the middle of a record
    f.write(b"\x30\x00\x00\x00\x00")
  assert tb_events.trim_after(str(tmp_path), 5) == {path.name: 5}
  assert [s for s, _ in tb_events.read_scalars(str(tmp_path))["train/loss"]] == list(range(6))
  assert kill_resume._event_files_whole(str(tmp_path)) == []  # CRC-checked, whole
  assert tb_events.trim_after(str(tmp_path), 5) == {}  # nothing more to drop: untouched
  # The resumed run logs 6.. again in a new file: every step once.
  _write(tmp_path, range(6, 9))
  assert [s for s, _ in tb_events.read_scalars(str(tmp_path))["train/loss"]] == list(range(9))
  # Resumed from nothing (killed before the first checkpoint): every summary goes, the
  # run logs its step 0 again.
  assert sum(tb_events.trim_after(str(tmp_path), 0).values()) == 9
  assert tb_events.read_scalars(str(tmp_path)) == {}
  assert metrics.create_writer(str(tmp_path / "new"), resume_step=3) is not None


# ---------------------------------------------------------------- damaged checkpoints

def _tree(v):
  return {"w": jnp.full((3, 4), v, jnp.float32), "b": jnp.arange(5, dtype=jnp.int32) + v}


def _three_checkpoints(d):
  ck = checkpoint.Checkpointer(str(d), max_to_keep=5)
  for s in (1, 2, 3):
    ck.save(s, _tree(float(s)))
  return ck


def _array_files(step_dir):
  """The array data files of a checkpoint step (orbax/tensorstore chunks under .../d/)."""
  return sorted(os.path.join(root, f) for root, _, files in os.walk(step_dir)
                if os.path.basename(root) == "d" for f in files)


def test_event_files_of_one_second_read_in_creation_order(tmp_path):
  """Writers made in the same second (a fast restart, or one process's writers 9 and 10)
  differ only in pid or writer count: those compare as numbers, not text."""
  first = tmp_path / "a"
  _write(first, range(0, 3))
  (old,) = first.iterdir()
  stem = "events.out.tfevents.1796629569.host.1288."
  os.rename(old, first / (stem + "9"))
  second = tmp_path / "b"
  _write(second, range(3, 5))
  (new,) = second.iterdir()
  os.rename(new, first / (stem + "10"))
  assert [s for s, _ in tb_events.read_scalars(str(first))["train/loss"]] == [0, 1, 2, 3, 4]


def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_intact_one(tmp_path):
  ck = _three_checkpoints(tmp_path / "ck")
  files = _array_files(tmp_path / "ck" / "3")
  assert files, os.listdir(tmp_path / "ck" / "3")
  for f in files:  # array data cut short
    with open(f, "r+b") as fh:
      fh.truncate(7)
  with pytest.raises(checkpoint.DamagedCheckpointError) as e:
    ck.restore(_tree(0.0))
  msg = str(e.value)
  assert "\n" not in msg and len(msg) < 800
  assert f"checkpoint {tmp_path / 'ck' / '3'} is damaged" in msg
  assert "the newest intact older checkpoint is step 2: resume from it with --resume_step=2" \
      in msg
  # An empty step folder (a copy that never finished): the same kind of error; both 3 and
  # 2 damaged now -> step 1 is offered.
  for f in os.listdir(tmp_path / "ck" / "2"):
    p = tmp_path / "ck" / "2" / f
    subprocess.run(["rm", "-rf", str(p)], check=True)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r"2 is damaged.*step 1"):
    ck.restore(_tree(0.0), step=2)
  # A mismatching tree stays a mismatch error, not "damaged".
  with pytest.raises(checkpoint.CheckpointMismatchError):
    ck.restore({"w": jnp.zeros((2, 2))}, step=1)


def test_a_damaged_checkpoint_with_no_intact_one_says_so(tmp_path):
  ck = _three_checkpoints(tmp_path / "ck")
  for s in (1, 2, 3):
    for f in _array_files(tmp_path / "ck" / str(s)):
      with open(f, "r+b") as fh:
        fh.truncate(5)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"3 is damaged.*no older checkpoint restores \(2 tried\)"):
    ck.restore(_tree(0.0))


def test_set_aside_after_moves_later_steps_and_deletes_nothing(tmp_path):
  ck = _three_checkpoints(tmp_path / "checkpoints")
  moved = checkpoint.set_aside_after(tmp_path / "checkpoints", 1)
  assert sorted(os.path.basename(m) for m in moved) == ["2", "3"]
  assert ck.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / "checkpoints_set_aside")) == ["2", "3"]
  restored, _ = ck.restore(_tree(0.0))
  np.testing.assert_array_equal(restored["w"], np.full((3, 4), 1.0))
  with pytest.raises(FileNotFoundError, match=r"--resume_step=7: no checkpoint for step 7 .*"
                                              r"available: \[1\]"):
    checkpoint.set_aside_after(tmp_path / "checkpoints", 7)


# End to end (two pretraining runs); the error and its message are tested in process above.
@pytest.mark.slow
def test_a_run_with_a_damaged_checkpoint_stops_and_resumes_from_the_offered_one(tmp_path):
  run_main(SMOKE, tmp_path, "--config.eval_every=0", "--config.steps=10",
           "--config.ckpt_every=5")
  for f in _array_files(tmp_path / "checkpoints" / "10"):
    with open(f, "r+b") as fh:
      fh.truncate(3)
  p = run_main(SMOKE, tmp_path, "--config.eval_every=0", "--config.steps=10",
               "--config.ckpt_every=5", check=False)
  assert p.returncode != 0
  line = [ln for ln in p.stderr.splitlines() if "DamagedCheckpointError" in ln][-1]
  assert str(tmp_path / "checkpoints" / "10") in line and "--resume_step=5" in line
  run_main(SMOKE, tmp_path, "--config.eval_every=0", "--config.steps=10",
           "--config.ckpt_every=5", "--resume_step=5")
  assert os.path.isdir(tmp_path / "checkpoints_set_aside" / "10")
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 10


# ---------------------------------------------------------------- kill and resume

def test_sigkill_and_sigterm_resume_to_the_same_params_and_curves(tmp_path):
  """An uninterrupted pretraining run vs one stopped by SIGTERM after its first checkpoint
  (exit 143, one line naming the checkpoint and the resume command) and then killed with
  SIGKILL at a random moment: byte-identical exported params, every TensorBoard step
  once with the same values, event files whole."""
  env = dict(kill_resume._env(JAX_CACHE), XLA_FLAGS=xla_flags())  # compiled as run_main's
  ref, intr = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  run_main(SMOKE, ref, *ARGS)
  cmd = kill_resume._command(SMOKE, intr, ARGS)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while kill_resume._latest(intr) is None:
    assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  stopped = kill_resume._latest(intr)
  (line,) = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM")]
  assert line.startswith(f"stopped by SIGTERM after step {stopped}: checkpoint step {stopped} "
                         f"in {intr}/checkpoints; resume with: python -m rft.main "
                         f"--config={SMOKE} --workdir={intr}")
  assert stopped < 20 and not os.path.exists(os.path.join(intr, "shapes_base.msgpack"))
  # SIGKILL as soon as the resumed run has written a newer checkpoint.
  starts = kill_resume.run_interrupted(cmd, intr, env, kills=1, duration=0.0,
                                       rng=random.Random(0))
  assert starts[0]["signal"] == "SIGKILL" and starts[0]["exit"] == -9
  assert starts[-1]["exit"] == 0
  out = kill_resume.compare(ref, intr)
  assert out["ok"], out["problems"]
  assert out["exports"] == ["shapes_base.msgpack"]
  steps = [s for s, _ in tb_events.read_scalars(intr)["train/loss"]]
  assert steps == list(range(5, 21, 5)), steps


def test_compare_finds_a_duplicated_step_and_a_different_export(tmp_path):
  for d in ("a", "b"):
    _write(tmp_path / d, [1, 2, 3])
    (tmp_path / d / "m.msgpack").write_bytes(b"same")
  assert kill_resume.compare(str(tmp_path / "a"), str(tmp_path / "b"))["ok"]
  _write(tmp_path / "b", [3])  # step 3 twice
  (tmp_path / "b" / "m.msgpack").write_bytes(b"other")
  problems = kill_resume.compare(str(tmp_path / "a"), str(tmp_path / "b"))["problems"]
  assert "m.msgpack differs" in problems
  assert any(p.startswith("train/loss: steps [1, 2, 3, 3]") for p in problems)


def test_kill_resume_cli_help():
  p = subprocess.run([sys.executable, "-m", "rft.tools.kill_resume", "--help"], cwd=ROOT,
                     capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert p.returncode == 0 and "--kills" in p.stdout


def test_pickle_refusals_name_the_config_key_inside_pickle_key(tmp_path):
  from rft.weights import io
  f = tmp_path / "w.bin"
  f.write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"so pass allow_pickle=True to load it"):
    io.read_weight_file(str(f))
  with io.pickle_key("allow_pickle"):
    with pytest.raises(ValueError, match=r"so pass --config\.allow_pickle=True to load it"):
      io.read_weight_file(str(f))
  assert io.allow_pickle_hint() == "allow_pickle=True"  # reset after the block
