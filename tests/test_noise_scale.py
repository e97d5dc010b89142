"""Gradient noise scale (rft/tools/noise_scale.py): the estimator against a known case,
and the PRDP per-step gradients on the smoke config."""
import numpy as np
import pytest

from rft import config as config_lib
from rft.tools import noise_scale


def test_noise_scale_recovers_known_signal_and_covariance():
  rng = np.random.default_rng(0)
  P, n, m, sigma = 2000, 64, 40, 3.0
  G = rng.normal(size=P) * 0.5  # |G|^2 ~ 500
  est = G + rng.normal(size=(m, P)) * sigma / np.sqrt(n)  # means of n samples of cov sigma^2 I
  out = noise_scale.noise_scale(est, n)
  np.testing.assert_allclose(out["signal"], G @ G, rtol=0.03)
  np.testing.assert_allclose(out["trace_cov"], sigma ** 2 * P, rtol=0.03)
  np.testing.assert_allclose(out["b_simple"], sigma ** 2 * P / (G @ G), rtol=0.06)
  # jackknife standard error of |G|^2 vs its exact std for Gaussian estimates:
  # var = 2 tr(C^2) / (m (m-1)) + 4 G'CG / m with C = sigma^2 / n I
  c = sigma ** 2 / n
  exact = np.sqrt(2 * P * c ** 2 / (m * (m - 1)) + 4 * c * (G @ G) / m)
  np.testing.assert_allclose(out["signal_se"], exact, rtol=0.3)
  assert out["b_low"] < out["b_simple"] < out["b_high"] < np.inf


def test_pure_noise_has_no_finite_noise_scale_and_one_estimate_is_an_error():
  est = np.random.default_rng(1).normal(size=(30, 500))
  # zero-mean estimates: the signal estimate is 0 up to its std sqrt(2P / (m(m-1))) = 0.76,
  # tiny next to the noise energy per estimate (P = 500)
  out = noise_scale.noise_scale(est, 8)
  assert abs(out["signal"]) < 3 * 0.76
  np.testing.assert_allclose(out["trace_cov"] / 8, 500, rtol=0.05)
  assert out["b_high"] == np.inf  # |G|^2 is not one standard error above 0
  assert noise_scale._fmt(out).startswith(("> ", "noise only"))
  with pytest.raises(ValueError, match="at least 2 estimates"):
    noise_scale.noise_scale(est[:1], 8)


def test_adam_like_scales_every_coordinate_to_unit_rms():
  est = np.array([[1.0, 0.0, -4.0], [1.0, 0.0, 4.0]])
  np.testing.assert_allclose(noise_scale.adam_like(est), [[1, 0, -1], [1, 0, 1]])


def test_report_sums_step_ranges():
  per_step = np.random.default_rng(2).normal(size=(4, 5, 50)) + 1.0
  rows = {r["steps"]: r for r in noise_scale.report(per_step, 16, trained_steps=3)}
  assert set(rows) >= {"0", "4", "0-1", "0-2", "0-3", "0-4"}
  assert rows["0-2"]["trained"] and not rows["0-3"]["trained"]
  want = noise_scale.noise_scale(per_step[:, :3].sum(1), 16)["b_simple"]
  assert rows["0-2"]["b_simple"] == pytest.approx(want)


def test_prdp_step_gradients_on_the_smoke_config():
  config = config_lib.load("prdp", "smoke")
  g, n = noise_scale.step_gradients(config, 2, prompts=2)
  T = config.sampler.num_steps
  assert n == 2 * config.samples_per_prompt
  assert g.shape[:2] == (2, T) and g.shape[2] > 100_000  # the UNet's params
  assert np.all(np.isfinite(g))
  assert np.all(np.abs(g).sum(-1) > 0)  # every step gets a gradient


def test_only_prdp_full_finetuning():
  config = config_lib.load("ddpo", "smoke")
  with pytest.raises(ValueError, match="objective.name='ddpo'"):
    noise_scale.step_gradients(config, 2, prompts=2)
