"""rft.train.loop.check_finite: the message names what diverged and the checkpoint to
resume from, or says that there is none."""
import math

import pytest

from rft.train import loop


class _Ckpt:
  def __init__(self, step):
    self.step = step

  def latest_step(self):
    return self.step


def test_check_finite_names_the_last_checkpoint_or_none():
  loop.check_finite(1.5, "loss", _Ckpt(None), "/w")  # finite: nothing happens
  with pytest.raises(FloatingPointError,
                     match=r"prdp loss at epoch 3 is nan; nothing saved for this epoch; last "
                           r"good checkpoint: epoch 2 in /w/checkpoints"):
    loop.check_finite(math.nan, "prdp loss at epoch 3", _Ckpt(2), "/w", unit="epoch")
  with pytest.raises(FloatingPointError) as e:
    loop.check_finite(math.inf, "loss at step 1", _Ckpt(None), "/w", unsaved=False)
  assert str(e.value) == "loss at step 1 is inf; no checkpoint was written in /w/checkpoints"


def test_check_diverged_by_hand():
  loop.check_diverged(99.0, 1.0, 100.0, "x", _Ckpt(1), "/w")  # within the bound
  loop.check_diverged(1e9, 1.0, 0.0, "x", _Ckpt(1), "/w")  # 0: off
  loop.check_diverged(1e9, 0.0, 100.0, "x", _Ckpt(1), "/w")  # no ratio from a zero start
  with pytest.raises(FloatingPointError, match=r"diverged \(norm inf"):  # float32 overflow
    loop.check_diverged(math.inf, 2.0, 100.0, "x", _Ckpt(1), "/w")
  with pytest.raises(FloatingPointError,
                     match=r"prdp at epoch 2: the trained parameters diverged \(norm 500, "
                           r"250x their starting norm 2; --config.max_param_norm_ratio=100\); "
                           r"nothing saved for this epoch; last good checkpoint: epoch 1"):
    loop.check_diverged(500.0, 2.0, 100.0, "prdp at epoch 2", _Ckpt(1), "/w", "epoch")


def test_params_norm_is_the_global_l2_norm():
  import jax.numpy as jnp
  import numpy as np
  tree = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]], jnp.bfloat16)}}
  assert loop.params_norm(tree) == 5.0
  assert loop.params_norm({"z": jnp.zeros(3)}) == 0.0
  np.testing.assert_allclose(loop.params_norm({"x": jnp.arange(4.0)}), np.sqrt(14.0), rtol=1e-6)


def test_a_diverging_run_stops_before_its_checkpoint(tmp_path):
  from rft import checkpoint
  from tests.helpers import run_main
  p = run_main("configs/prdp.py:smoke", tmp_path, "--config.lr=1e30", "--config.eval_every=0",
               "--config.ckpt_every=1", check=False)
  assert p.returncode != 0
  assert "prdp at epoch 1: the trained parameters diverged" in p.stderr
  assert "no checkpoint was written" in p.stderr
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() is None


def test_stop_signal_saves_flushes_and_exits_143(monkeypatch):
  import os
  import signal
  before = signal.getsignal(signal.SIGTERM)
  stop = loop.StopSignal()
  calls = []

  class Writer:
    def flush(self):
      calls.append("flush")

  loop.stop_if_signalled(stop, 3, "epoch", False, lambda: calls.append("save"), Writer(), "/w")
  assert calls == []  # no signal: nothing happens
  os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process survives
  assert stop.requested() and stop.received == signal.SIGTERM
  monkeypatch.setattr("sys.argv", ["/x/rft/main.py", "--config=configs/prdp.py:smoke",
                                   "--workdir=/w w"])
  with pytest.raises(loop.Stopped) as e:
    loop.stop_if_signalled(stop, 3, "epoch", False, lambda: calls.append("save"), Writer(),
                           "/w")
  assert e.value.code == 143 and calls == ["save", "flush"]
  calls.clear()
  with pytest.raises(loop.Stopped):  # the step's checkpoint exists already: not saved twice
    loop.stop_if_signalled(stop, 5, "epoch", True, lambda: calls.append("save"), Writer(), "/w")
  assert calls == ["flush"]
  assert loop.resume_command() == \
      "python -m rft.main --config=configs/prdp.py:smoke '--workdir=/w w'"
  stop.close()
  assert signal.getsignal(signal.SIGTERM) is before
