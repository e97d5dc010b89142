"""ReNO: the norm regulariser, per-example clipping, best-iterate tracking, the
differentiable deterministic sampler, and a smoke run of the trainer."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rft.diffusion.schedules import make_schedule
from rft.objectives import reno
from tests.helpers import ddim_sample, run_main


def test_norm_regularizer_by_hand():
  z = jnp.array([[[3.0, 4.0]], [[1.0, 0.0]]])  # d = 2, r = 5 and 1
  np.testing.assert_allclose(reno.norm_regularizer(z), [12.5 - math.log(5.0), 0.5], rtol=1e-6)
  z = jnp.full((1, 2, 2), 0.5)  # d = 4, r = 1: 0.5 - 3 log 1
  np.testing.assert_allclose(reno.norm_regularizer(z), [0.5], rtol=1e-6)


def test_norm_regularizer_gradient_is_the_closed_form():
  z = jax.random.normal(jax.random.key(0), (3, 4, 2)) * jnp.array([0.5, 1.0, 2.0])[:, None, None]
  g = jax.grad(lambda z: reno.norm_regularizer(z).sum())(z)
  d = 8
  r2 = jnp.sum(z ** 2, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(g, z - (d - 1) * z / r2, rtol=1e-5, atol=1e-6)
  # Zero on the shell r^2 = d - 1.
  shell = z / jnp.sqrt(r2) * math.sqrt(d - 1)
  np.testing.assert_allclose(jax.grad(lambda z: reno.norm_regularizer(z).sum())(shell), 0.0,
                             atol=1e-5)


def test_clip_per_example_caps_each_norm_and_keeps_direction():
  g = jnp.array([[6.0, 8.0], [0.03, 0.04]])  # norms 10 and 0.05
  c = reno.clip_per_example(g, 0.1)
  np.testing.assert_allclose(reno.per_example_norm(c), [0.1, 0.05], rtol=1e-6)
  np.testing.assert_allclose(c[0], g[0] / 100, rtol=1e-6)
  np.testing.assert_array_equal(c[1], g[1])
  np.testing.assert_array_equal(reno.clip_per_example(g, None), g)
  np.testing.assert_array_equal(reno.clip_per_example(g, 0.0), g)


# --------------------------------------------------------------------------- toy problem

TARGET = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])


def toy_reward(images, prompts):
  return -jnp.sum((images - prompts["target"]) ** 2, axis=-1)


def toy_optimize(z0, **kw):
  kw = {"grad_clip": None, "reg_weight": 0.0, **kw}
  return jax.jit(lambda z: reno.optimize(z, lambda x: x, toy_reward, {"target": TARGET}, **kw))(z0)


def test_loss_is_minus_reward_sum_plus_weighted_reg():
  z = jnp.ones((2, 3))
  total, aux = reno.loss(z, lambda x: 2 * x, toy_reward, {"target": TARGET}, 0.5)
  r = toy_reward(2 * z, {"target": TARGET})
  np.testing.assert_allclose(aux["reward"], r)
  np.testing.assert_allclose(aux["images"], 2 * z)
  np.testing.assert_allclose(total, -r.sum() + 0.5 * reno.norm_regularizer(z).sum(), rtol=1e-6)


def test_optimize_increases_the_reward():
  z0 = jnp.zeros((2, 3))
  out = toy_optimize(z0, n_iters=40, tx=optax.adam(0.2))
  init = toy_reward(z0, {"target": TARGET})
  np.testing.assert_allclose(out["initial_reward"], init)
  np.testing.assert_allclose(out["rewards"][0], init)
  assert out["rewards"].shape == (40, 2) and out["grad_norms"].shape == (40, 2)
  assert np.all(init < -5) and np.all(out["reward"] > -0.05)
  np.testing.assert_allclose(out["images"], out["z"])  # generate = identity
  np.testing.assert_allclose(toy_reward(out["z"], {"target": TARGET}), out["reward"], rtol=1e-6)


def test_optimize_returns_the_best_not_the_last_iterate():
  # lr 0.45 without momentum: z - t is multiplied by (1 - 2 lr) = 0.1 each step. At
  # iteration 3 the step size jumps (a schedule) to lr 3, multiplier -5: diverges.
  sched = lambda i: jnp.where(i < 3, 0.45, 3.0)
  out = toy_optimize(jnp.zeros((2, 3)), n_iters=8, tx=optax.sgd(sched))
  curve = np.asarray(out["rewards"])
  assert np.all(curve[-1] < curve.max(0))  # the construction: the last iterate is worse
  np.testing.assert_array_equal(out["best_iter"], curve.argmax(0))
  np.testing.assert_array_equal(out["best_iter"], [3, 3])
  np.testing.assert_allclose(out["reward"], curve.max(0))
  np.testing.assert_allclose(toy_reward(out["z"], {"target": TARGET}), out["reward"], rtol=1e-5)
  assert np.all(toy_reward(out["last_z"], {"target": TARGET}) < out["reward"])


def test_optimize_clips_each_example_step():
  # Plain SGD, lr 1: each step moves each example by exactly its clipped gradient norm.
  z0 = jnp.zeros((2, 3))
  out = toy_optimize(z0, n_iters=3, tx=optax.sgd(1.0), grad_clip=0.1)
  np.testing.assert_allclose(reno.per_example_norm(out["last_z"] - z0), [0.3, 0.3], rtol=1e-5)
  assert np.all(out["grad_norms"] > 1.0)  # unclipped norms are reported


def test_norm_regularizer_pulls_to_the_shell_under_optimize():
  z0 = 3.0 * jax.random.normal(jax.random.key(1), (4, 16))
  out = reno.optimize(z0, lambda x: x, lambda x, p: jnp.zeros(x.shape[0]), {}, n_iters=200,
                      tx=optax.sgd(0.05), grad_clip=None, reg_weight=1.0)
  np.testing.assert_allclose(reno.per_example_norm(out["last_z"]), math.sqrt(15), rtol=1e-3)


def test_make_optimizer():
  for name in ("sgd", "adam"):
    tx = reno.make_optimizer(name, 1.0, 0.9)
    tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3))
  tx = reno.make_optimizer("sgd", 1.0, 0.0)  # no momentum: plain SGD
  u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))
  np.testing.assert_allclose(u, -jnp.ones(3))
  try:
    reno.make_optimizer("lbfgs")
    raise AssertionError("expected ValueError")
  except ValueError as e:
    assert "lbfgs" in str(e)


# --------------------------------------------------------------------------- sampler


def _toy_eps(params, x, t, cond):
  return jnp.tanh(params["w"] * x + cond + t[:, None, None, None] / 1000.0)


def test_ddim_generate_matches_ddim_sample_and_has_finite_gradients():
  sched = make_schedule("cosine", 1000)
  params = {"w": jnp.float32(0.7)}
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  cond = jnp.array([0.1, -0.2])[:, None, None, None]
  kw = dict(schedule=sched, num_steps=4, clip_x0=1.0)
  ref = ddim_sample(_toy_eps, params, x_T, cond, None, eta=0.0, **kw).sample
  out = reno.ddim_generate(_toy_eps, params, x_T, cond, None, **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z: reno.ddim_generate(_toy_eps, params, z, cond, None, **kw).sum())(x_T)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # CFG path (guidance != 1) runs too.
  null = jnp.zeros((1, 1, 1, 1))
  ref = ddim_sample(_toy_eps, params, x_T, cond, null, eta=0.0, guidance_scale=1.5,
                    **kw).sample
  out = reno.ddim_generate(_toy_eps, params, x_T, cond, null, guidance_scale=1.5, **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- trainer


def test_reno_smoke_run_writes_finite_results(tmp_path):
  run_main("configs/reno.py:smoke", tmp_path)
  res = json.loads((tmp_path / "results.json").read_text())
  for split in ("train", "heldout"):
    r = res[split]
    nums = [v for k, v in r.items() if isinstance(v, (int, float))] + r["reward_curve"]
    assert nums and all(np.isfinite(nums))
    assert r["reward_best"] >= r["reward_initial"]
    assert 0.0 <= r["alignment_initial"] <= 1.0 and 0.0 <= r["alignment_best"] <= 1.0
    assert r["reward_queries"] == 4 * 3 and len(r["reward_curve"]) == 3
    assert (tmp_path / f"{split}_before_after.png").exists()
  assert res["reward_queries"] == 24 and res["wall_seconds"] > 0
  # The trainers' history form (rft.repro reads it): plain sampling at 0, best at the end.
  assert sorted(res["history"], key=int) == ["0", "3"]
  for split in ("train", "heldout"):
    for name, key in (("alignment", "alignment"), ("reward", "reward"),
                      ("p_caption", "p_caption")):
      assert res["history"]["0"][f"{split}/{name}"] == res[split][f"{key}_initial"]
      assert res["history"]["3"][f"{split}/{name}"] == res[split][f"{key}_best"]
