"""Reward shaping (rft/rewards/shaping.py): PAR, Clip / Delta process rewards, min-form
returns, per-component normalisation, DPA directions, and PAR from a config."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from rft import config as config_lib
from rft.data import shapes
from rft.rewards import base, jpeg, shaping


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- PAR


def test_par_hand_values():
  # Shared references [0, 2]: r=0 -> (σ(0) + σ(-2)) / 2, r=1 -> (σ(1) + σ(-1)) / 2 = 0.5.
  got = np.asarray(shaping.par(np.array([0.0, 1.0, 2.0]), [0.0, 2.0]))
  want = [(0.5 + 0.11920292) / 2, 0.5, (0.88079708 + 0.5) / 2]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # One number as the reference; per-sample references [N, M]; slope k.
  np.testing.assert_allclose(shaping.par(np.array([1.0, -1.0]), 0.0), [0.73105858, 0.26894142],
                             atol=1e-6)
  per_sample = np.array([[0.0, 1.0], [3.0, 5.0]])
  np.testing.assert_allclose(shaping.par(np.array([1.0, 4.0]), per_sample, k=2.0),
                             [(_sig(2.0) + 0.5) / 2, (_sig(2.0) + _sig(-2.0)) / 2], atol=1e-6)
  # Bounded in (0, 1), increasing in r; slope k/4 at the reference.
  r = np.linspace(-50, 50, 11)
  p = np.asarray(shaping.par(r, [0.0]))
  assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p) >= 0)
  g = jax.grad(lambda x: shaping.par(x, [0.5], k=3.0).sum())(jnp.array([0.5]))
  np.testing.assert_allclose(g, [0.75], atol=1e-6)


def test_par_bad_shapes():
  with pytest.raises(ValueError, match=r"\[N, M\] with N=2"):
    shaping.par(np.zeros(2), np.zeros((3, 1)))
  with pytest.raises(ValueError, match="rewards must be"):
    shaping.par(np.zeros((2, 2)), 0.0)
  with pytest.raises(ValueError, match="M = 0"):
    shaping.par(np.zeros(2), np.zeros((2, 0)))


# --------------------------------------------------------------------------- process rewards

R = np.array([[0.9, 0.2, 0.7, 0.0], [0.4, 0.6, 0.0, 0.0]], np.float32)
M = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)


def test_clip_process_rewards():
  got = np.asarray(shaping.clip_process_rewards(R, eta=0.5, mask=M))
  np.testing.assert_allclose(got, [[0.0, -0.3, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0]], atol=1e-6)
  # Every return is <= 0: repeating steps cannot raise it.
  assert np.all(np.asarray(shaping.sum_returns(got, M)) <= 0)


def test_delta_process_rewards_and_their_returns():
  got = np.asarray(shaping.delta_process_rewards(R, M))
  np.testing.assert_allclose(got, [[0.7, -0.5, 0.7, 0.0], [-0.2, 0.6, 0.0, 0.0]], atol=1e-6)
  # The sum-form return from step t telescopes to r_t, on random rows of random lengths.
  rng = np.random.default_rng(0)
  r = rng.uniform(-1, 1, (5, 7)).astype(np.float32)
  lengths = np.array([1, 3, 7, 5, 2])
  m = np.arange(7)[None] < lengths[:, None]
  ret = np.asarray(shaping.sum_returns(shaping.delta_process_rewards(r, m), m))
  np.testing.assert_allclose(ret, np.where(m, r, 0.0), atol=1e-5)


def test_sum_and_min_form_returns():
  np.testing.assert_allclose(shaping.sum_returns(R, M),
                             [[1.8, 0.9, 0.7, 0.0], [1.0, 0.6, 0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(shaping.sum_returns(R[:1], M[:1], gamma=0.5),
                             [[0.9 + 0.5 * 0.2 + 0.25 * 0.7, 0.2 + 0.5 * 0.7, 0.7, 0.0]],
                             atol=1e-6)
  np.testing.assert_allclose(shaping.min_form_returns(R, M),
                             [[0.2, 0.2, 0.7, 0.0], [0.4, 0.6, 0.0, 0.0]], atol=1e-6)
  # Without a mask every step counts (the padding zeros become the minimum).
  np.testing.assert_allclose(shaping.min_form_returns(R[:1]), [[0.0, 0.0, 0.0, 0.0]])


def test_pure_softmin_rewards():
  # r = [0.2, 0.8], T = 0.1: weights softmax([-2, -8]) = [1, e^-6] / (1 + e^-6).
  got = np.asarray(shaping.pure_softmin_rewards(np.array([[0.2, 0.8, 5.0]]),
                                                np.array([[1, 1, 0]], bool), 0.1))
  w = np.array([1.0, math.exp(-6)]) / (1 + math.exp(-6))
  np.testing.assert_allclose(got, [[w[0] * 0.2, w[1] * 0.8, 0.0]], atol=1e-7)
  # Their sum approaches the min over valid steps as T -> 0 (the padded 5.0 is ignored).
  r = np.array([[0.3, -0.4, 0.9, 5.0]], np.float32)
  m = np.array([[1, 1, 1, 0]], bool)
  s = float(shaping.pure_softmin_rewards(r, m, 0.01).sum())
  assert abs(s - (-0.4)) < 1e-6
  with pytest.raises(ValueError, match="temperature"):
    shaping.pure_softmin_rewards(r, m, 0.0)


# --------------------------------------------------------------------------- normalisation


def test_multi_reward_normalize_hand_values():
  eps = 1e-4
  a = 1 / (math.sqrt(2) + eps)  # a pair (y + 1, y - 1) z-scores to (a, -a) (std √2, ddof 1)
  # Group 1: reward 2 (scale 10) dominates the sum, but counts like reward 1 once each is
  # normalised; group 2: reward 2 constant -> contributes 0.
  x = np.array([[1.0, 10.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
  w = [1.0, 1.0]

  s_sum = np.asarray(shaping.multi_reward_normalize(x, w, order="sum_then_normalize",
                                                    group_size=2))
  # group sums [11, 3] and [2, 0]: z = (±4) / (4√2 + eps), (±1) / (√2 + eps).
  np.testing.assert_allclose(s_sum, [4 / (4 * math.sqrt(2) + eps), -4 / (4 * math.sqrt(2) + eps),
                                     a, -a], atol=1e-6)
  s_gdpo = np.asarray(shaping.multi_reward_normalize(x, w, group_size=2, batch_renorm=False))
  z1 = 1 / (math.sqrt(2) + eps)          # reward 1, group 1: (1, 3) -> (-z1, z1)
  z2 = 5 / (5 * math.sqrt(2) + eps)      # reward 2, group 1: (10, 0) -> (z2, -z2)
  np.testing.assert_allclose(s_gdpo, [-z1 + z2, z1 - z2, a, -a], atol=1e-6)
  assert abs(s_gdpo[0]) < 1e-4  # the two rewards cancel in group 1
  # GDPO's final batch z-score (ddof = 1).
  full = np.asarray(shaping.multi_reward_normalize(x, w, group_size=2))
  c = s_gdpo - s_gdpo.mean()
  np.testing.assert_allclose(full, c / (np.std(s_gdpo, ddof=1) + eps), atol=1e-5)
  # Whole-batch scope, centring only.
  np.testing.assert_allclose(
      shaping.multi_reward_normalize(x, [2.0, 0.0], order="sum_then_normalize", scale=False),
      2 * (x[:, 0] - x[:, 0].mean()), atol=1e-6)


def test_multi_reward_normalize_matches_grpo_aggregate():
  from rft.objectives import grpo
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 3)).astype(np.float32) * [1.0, 10.0, 0.1]
  w = np.array([1.0, 0.5, 2.0], np.float32)
  want, _ = grpo.aggregate(x, w, 4, "normalize_then_sum")
  np.testing.assert_allclose(shaping.multi_reward_normalize(x, w, group_size=4), want,
                             rtol=1e-5, atol=1e-5)


def test_multi_reward_normalize_errors():
  with pytest.raises(ValueError, match="unknown order"):
    shaping.multi_reward_normalize(np.zeros((4, 2)), [1, 1], order="both")
  with pytest.raises(ValueError, match="group_size=3"):
    shaping.multi_reward_normalize(np.zeros((4, 2)), [1, 1], group_size=3)
  with pytest.raises(ValueError, match=r"\[N, R\]"):
    shaping.multi_reward_normalize(np.zeros((4, 2)), [1, 1, 1])


# --------------------------------------------------------------------------- DPA


def test_directional_reward_and_angles():
  np.testing.assert_allclose(shaping.direction([0.0, math.pi / 2, math.pi / 4]),
                             [[1, 0], [0, 1], [math.sqrt(0.5), math.sqrt(0.5)]], atol=1e-6)
  r = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
  v = shaping.direction([0.0, math.pi / 2])  # one direction per prompt, 2 samples each
  np.testing.assert_allclose(shaping.directional_reward(r, v, group_size=2), [1, 3, 6, 8],
                             atol=1e-6)
  v = shaping.direction([-math.pi / 4])
  np.testing.assert_allclose(shaping.directional_reward(r[:1], v),
                             [math.sqrt(0.5) * (1 - 2)], atol=1e-6)
  with pytest.raises(ValueError, match="group_size=3"):
    shaping.directional_reward(r, v, group_size=3)
  theta = np.asarray(shaping.sample_angles(jax.random.key(0), 1000, (0.1, 0.5)))
  assert theta.shape == (1000,) and theta.min() >= 0.1 and theta.max() <= 0.5
  assert abs(theta.mean() - 0.3) < 0.02 and len(np.unique(theta)) > 900
  np.testing.assert_array_equal(theta, shaping.sample_angles(jax.random.key(0), 1000,
                                                             (0.1, 0.5)))
  default = np.asarray(shaping.sample_angles(jax.random.key(1), 100))
  assert np.all(np.abs(default) <= math.pi / 4)
  with pytest.raises(ValueError, match="theta_range"):
    shaping.sample_angles(jax.random.key(0), 3, (1.0, 0.0))


# --------------------------------------------------------------------------- PAR from a config


def _shapes_batch(n=8, seed=0):
  world = shapes.ShapesWorld()
  images, ids, _ = world.sample(np.random.default_rng(seed), n, "train")
  tok = shapes.tokenizer()
  ids = np.roll(ids, 1)  # half right, half wrong captions: rewards spread out
  prompts = {"ids": jnp.asarray(ids),
             "tokens": jnp.asarray(tok.encode([world.texts[i] for i in ids])),
             "assignments": jnp.asarray(world.assignments(ids))}
  return jnp.asarray(images), prompts, len(world.texts)


def test_par_shaping_built_from_a_config(tmp_path):
  c = config_lib.load("prdp:smoke")
  c.reward = "shapes_alignment_log"
  c.reward_options = config_dict.ConfigDict({"shapes_alignment_log": {
      "shaping": "par", "shaping_reference": [-1.0, -3.0], "shaping_k": 2.0}})
  shaped = base.build(c.reward, options=c.reward_options, scorer_dir=c.scorer_dir or None)
  raw = base.build("shapes_alignment_log", scorer_dir=c.scorer_dir or None)
  images, prompts, num_prompts = _shapes_batch()
  r = np.asarray(raw(images, prompts), np.float64)
  assert r.std() > 0.5, r  # a spread of raw rewards
  want = [(_sig(2 * (x + 1)) + _sig(2 * (x + 3))) / 2 for x in r]
  got = shaped(images, prompts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert shaped.name == "shapes_alignment_log" and shaped.differentiable and not shaped.host
  np.testing.assert_allclose(jax.jit(shaped.fn)(images, prompts), want, rtol=1e-5, atol=1e-6)
  parts = shaped.parts(images, prompts)
  assert set(parts) == {"shapes_alignment_log", "shapes_alignment_log_unshaped"}
  np.testing.assert_allclose(parts["shapes_alignment_log_unshaped"], r, rtol=1e-5, atol=1e-5)
  # Gradients flow through the shaping: d/dx PAR = mean_m k σ'(.) · dr/dx.
  g = jax.grad(lambda x: shaped(x, prompts).sum())(images)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0

  # Per-prompt references from a file, looked up by prompt id; weighted with another term.
  table = np.stack([np.linspace(-4, 0, num_prompts), np.zeros(num_prompts)], 1)
  np.save(tmp_path / "refs.npy", table.astype(np.float32))
  c.reward = "shapes_alignment_log:0.5,brightness:1"
  c.reward_options = config_dict.ConfigDict({"shapes_alignment_log": {
      "shaping": "par", "shaping_reference": str(tmp_path / "refs.npy")}})
  both = base.build(c.reward, options=c.reward_options)
  ids = np.asarray(prompts["ids"])
  lum = np.asarray(base.build("brightness")(images, prompts))
  want = [0.5 * (_sig(x - table[i, 0]) + _sig(x - table[i, 1])) / 2 for x, i in zip(r, ids)]
  np.testing.assert_allclose(both(images, prompts), np.asarray(want) + lum, rtol=1e-5,
                             atol=1e-5)
  assert set(both.parts(images, prompts)) == {"shapes_alignment_log",
                                              "shapes_alignment_log_unshaped", "brightness"}


def test_par_shaping_of_a_host_reward():
  x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  x[0] = 0.0
  r = base.build("jpeg_compressibility", options={"jpeg_compressibility": {
      "shaping": "par", "shaping_reference": -1.0}})
  assert r.host and not r.differentiable
  kb = jpeg.jpeg_size_kb(x)
  got = r(x, {})
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  np.testing.assert_allclose(got, [_sig(-k + 1.0) for k in kb], atol=1e-6)


def test_shaping_option_errors(tmp_path):
  def build(**opts):
    return base.build("brightness", options={"brightness": opts})

  with pytest.raises(ValueError, match=r"config\.reward_options\.brightness\.shaping='pbr': "
                                       r"unknown shaping; known: \['par'\]"):
    build(shaping="pbr", shaping_reference=0.0)
  with pytest.raises(ValueError, match=r"reward_options\.brightness\.shaping='par' needs "
                                       r"config\.reward_options\.brightness\.shaping_reference"):
    build(shaping="par")
  with pytest.raises(ValueError, match=r"reward_options\.brightness\.shaping_k=-1"):
    build(shaping="par", shaping_reference=0.0, shaping_k=-1)
  with pytest.raises(ValueError, match=r"unknown shaping option\(s\) \['shaping_ref'\]"):
    build(shaping="par", shaping_ref=0.0)
  with pytest.raises(ValueError, match=r"given without config\.reward_options\.brightness"
                                       r"\.shaping"):
    build(shaping_reference=0.0)
  with pytest.raises(ValueError, match=r"shaping_reference=\['x'\]: expected a number"):
    build(shaping="par", shaping_reference=["x"])
  with pytest.raises(ValueError, match=r"shaping_reference=.*refs\.txt.: expected a \.npy"):
    (tmp_path / "refs.txt").write_text("0")
    build(shaping="par", shaping_reference=str(tmp_path / "refs.txt"))
  with pytest.raises(FileNotFoundError, match=r"shaping_reference=.*nowhere\.npy"):
    build(shaping="par", shaping_reference=str(tmp_path / "nowhere.npy"))
  with pytest.raises(ValueError, match=r"reward_options\.brightness\.shaping_reference: "
                                       r"reference rewards must be finite"):
    build(shaping="par", shaping_reference=[0.0, float("nan")])
  # A factory option that does not exist still names the reward, and lists shaping keys.
  with pytest.raises(ValueError, match=r"config\.reward_options\.brightness: unknown "
                                       r"option\(s\) \['gamma'\].*shaping_reference"):
    build(gamma=2.0)
  # Per-prompt references need prompt ids.
  (tmp_path / "refs.json").write_text("[[0.0], [1.0]]")
  r = build(shaping="par", shaping_reference=str(tmp_path / "refs.json"))
  with pytest.raises(ValueError, match="carry no 'ids'"):
    r(np.zeros((1, 2, 2, 3), np.float32), {})
  np.testing.assert_allclose(r(np.zeros((2, 2, 2, 3), np.float32), {"ids": np.array([1, 0])}),
                             [_sig(0.5 - 1.0), _sig(0.5)], atol=1e-6)
