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
