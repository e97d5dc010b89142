"""AdamW schedules of rft.train.state.make_optimizer."""
import jax.numpy as jnp
import numpy as np

from rft.train.state import TrainState, make_optimizer


def _first_steps(tx, n):
  st = TrainState.create({"w": jnp.zeros(3)}, tx)
  moves = []
  for _ in range(n):
    before = np.asarray(st.params["w"])
    st = st.apply_gradients({"w": jnp.array([1.0, -2.0, 0.5])}, tx)
    moves.append(np.asarray(st.params["w"]) - before)
  return moves


def test_constant_schedule_without_warmup_moves_on_the_first_update():
  # Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v)), eps aside.
  m = _first_steps(make_optimizer(1e-2, 100, 0, schedule="constant"), 2)
  np.testing.assert_allclose(m[0], [-1e-2, 1e-2, -1e-2], rtol=1e-4)
  np.testing.assert_allclose(m[1], [-1e-2, 1e-2, -1e-2], rtol=1e-4)


def test_constant_schedule_with_warmup_ramps_linearly():
  m = _first_steps(make_optimizer(1e-2, 100, 4, schedule="constant"), 6)
  np.testing.assert_allclose([abs(x[0]) for x in m], [0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2],
                             rtol=1e-4, atol=1e-8)


def test_sgd_moves_each_coordinate_in_proportion_to_its_gradient():
  # g = [1, -2, 0.5], |g| = 2.29 > clip 1: clipped to g / |g|; momentum 0.9:
  # step 1 = -lr * c, step 2 = -lr * (c + 0.9 c) (no weight decay: params start at 0).
  tx = make_optimizer(1e-2, 100, 0, weight_decay=0.1, grad_clip=1.0, b1=0.9,
                      schedule="constant", name="sgd")
  m = _first_steps(tx, 2)
  c = np.array([1.0, -2.0, 0.5]) / np.sqrt(5.25)
  np.testing.assert_allclose(m[0], -1e-2 * c, rtol=1e-5)
  w1 = -1e-2 * c
  # decoupled decay enters the gradient: g2 = c + 0.1 * w1 (w1 was not clipped: |.| < 1 after
  # the clip acts on the raw gradient only), momentum trace 0.9 * c + g2.
  np.testing.assert_allclose(m[1], -1e-2 * (0.9 * c + c + 0.1 * w1), rtol=1e-5)


def test_unknown_optimizer_is_an_error():
  import pytest
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    make_optimizer(1e-2, 10, name="lamb")
