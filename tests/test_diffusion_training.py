"""eps_loss: exact values with cheating / zero denoisers, min-SNR weights, cond dropout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.diffusion.schedules import make_schedule
from rft.diffusion.training import eps_loss

SCHED = make_schedule("linear")
AB = np.asarray(SCHED.alphas_cumprod, np.float64)
B = 16


def _x0(seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (B, 4, 4, 2)), jnp.float32)


@functools.partial(jax.jit, static_argnames="snr_gamma")
def _run_zero_denoiser(x0, cond, null, rng, cond_dropout, snr_gamma=None):
  """eps_loss with an all-zeros denoiser; also returns the (x_t, t, cond) it was given.

  cond_dropout is traced here, so one compilation serves every probability.
  """
  seen = {}

  def eps_fn(params, x_t, t, c):
    seen.update(x_t=x_t, t=t, cond=c)
    return jnp.zeros_like(x_t)

  loss, metrics = eps_loss(eps_fn, None, x0, cond, null, rng, SCHED, cond_dropout=cond_dropout,
                           snr_gamma=snr_gamma)
  return loss, metrics, seen


def _key(seed):
  return jax.random.key(seed, impl="rbg")  # cheap to compile; eps_loss takes any key type


def _true_noise(x0):
  """A denoiser that knows x0 (closure) and so returns exactly the noise used."""
  def fn(params, x_t, t, cond):
    ab = jnp.asarray(AB, jnp.float32)[t][:, None, None, None]
    return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
  return fn


def test_true_noise_denoiser_has_zero_loss():
  x0 = _x0()
  cond = jnp.ones((B, 3))
  loss, metrics = jax.jit(
      lambda r: eps_loss(_true_noise(x0), None, x0, cond, None, r, SCHED, cond_dropout=0.0))(
          jax.random.PRNGKey(1))
  assert loss.shape == () and loss.dtype == jnp.float32
  assert float(loss) < 1e-8
  assert set(metrics) >= {"loss", "mse", "cond_dropout_frac"}


def test_zero_denoiser_loss_is_mean_noise_squared():
  x0 = jnp.zeros((B, 4, 4, 2))  # then x_t = sqrt(1 - ab_t) * noise
  args = (x0, jnp.ones((B, 3)), jnp.zeros((1, 3)))
  loss, metrics, seen = _run_zero_denoiser(*args, _key(2), 0.0)
  t = np.asarray(seen["t"])
  assert seen["t"].dtype == jnp.int32 and t.shape == (B,)
  assert t.min() >= 0 and t.max() < 1000 and len(np.unique(t)) > 4  # uniform draws
  noise = np.asarray(seen["x_t"], np.float64) / np.sqrt(1 - AB[t])[:, None, None, None]
  np.testing.assert_allclose(float(loss), np.mean(noise ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mse"]), np.mean(noise ** 2), rtol=1e-5)
  assert abs(np.mean(noise ** 2) - 1.0) < 0.3  # it really is unit Gaussian noise
  # Another rng, another draw.
  other, _, _ = _run_zero_denoiser(*args, _key(3), 0.0)
  assert float(other) != float(loss)


def test_min_snr_weighting():
  x0 = jnp.zeros((B, 4, 4, 2))
  gamma = 5.0
  loss, metrics, seen = _run_zero_denoiser(x0, jnp.ones((B, 3)), jnp.zeros((1, 3)), _key(3), 0.0,
                                           snr_gamma=gamma)
  t = np.asarray(seen["t"])
  noise = np.asarray(seen["x_t"], np.float64) / np.sqrt(1 - AB[t])[:, None, None, None]
  per_example = np.mean(noise.reshape(B, -1) ** 2, axis=1)
  snr = AB[t] / (1 - AB[t])
  weight = np.minimum(snr, gamma) / snr
  assert weight.min() < 1.0 and weight.max() == 1.0  # some low-noise steps down-weighted
  np.testing.assert_allclose(float(loss), np.mean(weight * per_example), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["mse"]), np.mean(per_example), rtol=1e-5)
  assert float(loss) < float(metrics["mse"])


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_cond_dropout(p):
  cond = {"text": jnp.arange(B * 3, dtype=jnp.float32).reshape(B, 3) + 1.0,
          "mask": jnp.ones((B, 3), bool)}
  null = {"text": jnp.full((1, 3), -7.0), "mask": jnp.zeros((1, 3), bool)}
  _, metrics, seen = _run_zero_denoiser(_x0(), cond, null, _key(4), p)
  got_text, got_mask = np.asarray(seen["cond"]["text"]), np.asarray(seen["cond"]["mask"])
  assert got_text.shape == (B, 3) and got_mask.shape == (B, 3)
  dropped = np.all(got_text == -7.0, axis=1)
  kept = np.all(got_text == np.asarray(cond["text"]), axis=1)
  assert np.all(dropped | kept)  # every row is either its own cond or the null cond
  np.testing.assert_array_equal(got_mask, ~dropped[:, None].repeat(3, 1))  # leaves agree
  np.testing.assert_allclose(float(metrics["cond_dropout_frac"]), dropped.mean())
  if p == 0.0:
    assert not dropped.any()
  elif p == 1.0:
    assert dropped.all()
  else:
    assert 0 < dropped.sum() < B


def test_null_cond_required_for_dropout_and_shape_checked():
  fn = lambda p, x, t, c: jnp.zeros_like(x)
  with pytest.raises(ValueError, match="null_cond"):
    eps_loss(fn, None, _x0(), jnp.ones((B, 3)), None, jax.random.PRNGKey(0), SCHED,
             cond_dropout=0.1)
  with pytest.raises(ValueError, match="leading batch dim"):
    eps_loss(fn, None, _x0(), jnp.ones((B, 3)), jnp.zeros((2, 3)), jax.random.PRNGKey(0), SCHED,
             cond_dropout=0.1)


def test_gradient_of_loss_is_finite_and_jits():
  def eps_fn(w, x, t, c):
    return x * w["scale"] + c[:, None, None, :1] * w["bias"]

  params = {"scale": jnp.float32(0.5), "bias": jnp.float32(0.1)}
  x0 = _x0()
  grad = jax.jit(jax.grad(lambda w, r: eps_loss(eps_fn, w, x0, jnp.ones((B, 3)),
                                                jnp.zeros((1, 3)), r, SCHED,
                                                snr_gamma=5.0)[0]))(params, jax.random.PRNGKey(5))
  assert all(np.isfinite(float(g)) and float(g) != 0 for g in jax.tree_util.tree_leaves(grad))


def test_high_noise_emphasis_draws_and_weights_by_hand():
  """high_noise_frac 1: every t in [start T, T); x0_weight_cap: errors weighted by
  min(1/alpha_bar_t, cap) over the batch mean of those weights."""
  x0 = jnp.zeros((B, 4, 4, 2))
  seen = {}

  def eps_fn(params, x_t, t, c):
    seen.update(x_t=x_t, t=t)
    return jnp.zeros_like(x_t)

  loss, metrics = eps_loss(eps_fn, None, x0, jnp.ones((B, 3)), None, _key(4), SCHED,
                           cond_dropout=0.0, high_noise_frac=1.0, high_noise_start=0.9,
                           x0_weight_cap=50.0)
  t = np.asarray(seen["t"])
  assert t.min() >= 900 and t.max() < 1000
  noise = np.asarray(seen["x_t"], np.float64) / np.sqrt(1 - AB[t])[:, None, None, None]
  per_example = np.mean(noise.reshape(B, -1) ** 2, axis=1)
  w = np.minimum(1 / AB[t], 50.0)
  np.testing.assert_allclose(float(loss), np.mean(w / w.mean() * per_example), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["mse"]), per_example.mean(), rtol=1e-5)
  # Off by default: the same key draws t over all of [0, T) and the plain mean.
  loss0, m0 = eps_loss(eps_fn, None, x0, jnp.ones((B, 3)), None, _key(4), SCHED,
                       cond_dropout=0.0)
  assert float(loss0) == float(m0["mse"])
