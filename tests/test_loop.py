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
