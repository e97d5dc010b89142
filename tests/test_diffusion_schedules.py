"""Noise schedules: endpoints and shapes against hand numbers, add_noise, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.diffusion.schedules import Schedule, add_noise, make_schedule, snr


def _np(a):
  return np.asarray(a, np.float64)


def test_linear_endpoints_and_monotone():
  s = make_schedule("linear")
  assert s.num_train_timesteps == 1000
  assert s.betas.shape == (1000,) and s.alphas_cumprod.shape == (1000,)
  assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.dtype == jnp.float32
  b, ab = _np(s.betas), _np(s.alphas_cumprod)
  np.testing.assert_allclose(b[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(b[1], 1e-4 + (0.02 - 1e-4) / 999, rtol=1e-6)
  np.testing.assert_allclose(b[-1], 0.02, rtol=1e-6)
  np.testing.assert_allclose(ab[0], 0.9999, rtol=1e-7)
  np.testing.assert_allclose(ab[1], 0.9999 * (1 - b[1]), rtol=1e-6)
  # DDPM's linear schedule ends at alpha_bar_T ~= 4.04e-5 (sqrt ~= 0.00635).
  np.testing.assert_allclose(ab[-1], 4.0358e-05, rtol=1e-3)
  assert np.all(np.diff(ab) < 0)


def test_scaled_linear_stable_diffusion_values():
  s = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
  b, ab = _np(s.betas), _np(s.alphas_cumprod)
  np.testing.assert_allclose(b[0], 0.00085, rtol=1e-6)
  np.testing.assert_allclose(b[-1], 0.012, rtol=1e-6)
  r0, r1 = math.sqrt(0.00085), math.sqrt(0.012)
  np.testing.assert_allclose(b[1], (r0 + (r1 - r0) / 999) ** 2, rtol=1e-6)
  np.testing.assert_allclose(ab[0], 1 - 0.00085, rtol=1e-7)
  # Stable Diffusion's final alpha_bar is ~0.00466.
  np.testing.assert_allclose(ab[-1], 0.00466, rtol=2e-3)
  assert np.all(np.diff(ab) < 0)
  # Differs from plain linear with the same endpoints (not silently the same schedule).
  lin = _np(make_schedule("linear", beta_start=0.00085, beta_end=0.012).betas)
  assert abs(lin[500] - b[500]) > 1e-4


def test_cosine_matches_nichol_dhariwal():
  T = 1000
  s = make_schedule("cosine", T)
  b, ab = _np(s.betas), _np(s.alphas_cumprod)

  def f(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

  # Without clipping the cumulative product telescopes: ab[t] = f((t+1)/T) / f(0).
  for t in (0, 1, 250, 499, 900):
    np.testing.assert_allclose(ab[t], f((t + 1) / T) / f(0), rtol=2e-5)
  np.testing.assert_allclose(ab[499], 0.49384, rtol=1e-4)
  np.testing.assert_allclose(b[0], 1 - f(1 / T) / f(0), rtol=1e-5)
  # The last beta (f(1) = 0) is clipped to 0.999, and no beta exceeds it.
  np.testing.assert_allclose(b[-1], 0.999, rtol=1e-7)
  assert b.max() <= 0.999 + 1e-7
  np.testing.assert_allclose(ab[-1], ab[-2] * (1 - 0.999), rtol=1e-4)
  assert np.all(np.diff(ab) < 0) and ab[-1] > 0


def test_other_num_train_timesteps():
  s = make_schedule("linear", num_train_timesteps=10, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(_np(s.betas), np.linspace(0.1, 0.2, 10), rtol=1e-6)
  np.testing.assert_allclose(_np(s.alphas_cumprod), np.cumprod(1 - np.linspace(0.1, 0.2, 10)),
                             rtol=1e-6)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    make_schedule("sigmoid")
  msg = str(err.value)
  assert "sigmoid" in msg
  for name in ("linear", "scaled_linear", "cosine"):
    assert name in msg


def test_schedule_is_pytree_with_static_length():
  s = make_schedule("linear", num_train_timesteps=50)
  leaves = jax.tree_util.tree_leaves(s)
  assert len(leaves) == 2
  out = jax.jit(lambda sch: (sch.alphas_cumprod[-1], sch.num_train_timesteps))(s)
  assert out[1] == 50  # static field comes back as a Python int
  assert isinstance(s, Schedule)


def test_add_noise_matches_hand_computation():
  s = make_schedule("linear")
  rng = np.random.RandomState(0)
  x0 = rng.randn(3, 4, 4, 2).astype(np.float32)
  noise = rng.randn(3, 4, 4, 2).astype(np.float32)
  t = np.array([0, 499, 999], np.int32)
  ab = _np(s.alphas_cumprod)[t][:, None, None, None]
  want = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  got = add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  assert got.shape == x0.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # t = 999 is almost pure noise, t = 0 almost clean.
  assert np.abs(np.asarray(got)[2] - noise[2]).max() < 0.02
  assert np.abs(np.asarray(got)[0] - x0[0]).max() < 0.05
  # Scalar t broadcasts over the batch.
  got_scalar = add_noise(s, jnp.asarray(x0), jnp.asarray(noise), 499)
  ab5 = _np(s.alphas_cumprod)[499]
  np.testing.assert_allclose(np.asarray(got_scalar), np.sqrt(ab5) * x0 + np.sqrt(1 - ab5) * noise,
                             rtol=1e-5, atol=1e-6)


def test_snr():
  s = make_schedule("cosine")
  ab = _np(s.alphas_cumprod)
  np.testing.assert_allclose(np.asarray(snr(s, jnp.array([0, 500]))), ab[[0, 500]] / (1 - ab[[0, 500]]),
                             rtol=1e-4)
