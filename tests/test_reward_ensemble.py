"""Reward-model ensembles (rft/rewards/ensemble.py): combination rules by hand, and the
registered "ensemble" reward over two ShapesWorld reward models built from a config."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from rft import config as config_lib
from rft import pretrained
from rft.data import shapes
from rft.rewards import base, ensemble, jpeg

# K = 3 members, N = 3 samples. Per sample: mean 2, 2, 2; variance (ddof 0) 2/3, 8, 0.
S = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 6.0, 2.0]])


@pytest.mark.parametrize("rule, lam, want", [
    ("mean", 1.0, [2.0, 2.0, 2.0]),
    ("median", 1.0, [2.0, 0.0, 2.0]),
    ("min", 1.0, [1.0, 0.0, 2.0]),
    ("mean_minus_std", 1.0, [2 - math.sqrt(2 / 3), 2 - math.sqrt(8), 2.0]),
    ("mean_minus_std", 0.5, [2 - 0.5 * math.sqrt(2 / 3), 2 - 0.5 * math.sqrt(8), 2.0]),
    ("uwo", 0.5, [2 - 1 / 3, 2 - 4, 2.0]),
    ("ctrl_u", 1.0, [2 * math.exp(-2 / 3) - 2 / 3, 2 * math.exp(-8) - 8, 2.0]),
])
def test_combine_rules_hand_values(rule, lam, want):
  np.testing.assert_allclose(ensemble.combine_scores(S, rule, lam), want, rtol=1e-6, atol=1e-6)


def test_member_stats_and_uncertainty_weights():
  mean, std = ensemble.member_stats(S)
  np.testing.assert_allclose(mean, [2, 2, 2], atol=1e-6)
  np.testing.assert_allclose(std, [math.sqrt(2 / 3), math.sqrt(8), 0.0], atol=1e-6)
  np.testing.assert_allclose(ensemble.uncertainty_weights(S, 0.5),
                             [math.exp(-1 / 3), math.exp(-4), 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown ensemble rule 'max'"):
    ensemble.combine_scores(S, "max")
  with pytest.raises(ValueError, match=r"\[K, N\]"):
    ensemble.combine_scores(np.zeros(3))


def _second_scorer(directory):
  """A copy of the shipped alignment reward model with perturbed weights (a stand-in for a
  second seed) in `directory`."""
  params, meta = pretrained.load_bundle("shapes_reward")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda p: np.asarray(p) + 0.3 * np.std(p) * rng.normal(size=np.shape(p)).astype(np.float32),
      params)
  pretrained.save_bundle("shapes_reward", params, meta, str(directory))
  return str(directory)


def _shapes_batch(n=8, seed=0):
  world = shapes.ShapesWorld()
  images, ids, _ = world.sample(np.random.default_rng(seed), n, "train")
  ids = np.roll(ids, 1)  # wrong captions for most: log-probs spread out
  tok = shapes.tokenizer()
  return jnp.asarray(images), {
      "ids": jnp.asarray(ids), "tokens": jnp.asarray(tok.encode([world.texts[i] for i in ids])),
      "assignments": jnp.asarray(world.assignments(ids))}


def test_ensemble_of_shapes_reward_models_from_a_config(tmp_path):
  seed2 = _second_scorer(tmp_path / "seed2")
  c = config_lib.load("prdp:smoke")
  c.reward = "ensemble"
  # Member 0 takes the run's scorer_dir (the shared kwargs); member 1 names its own.
  c.reward_options = config_dict.ConfigDict({"ensemble": {
      "members": ["shapes_alignment_log",
                  {"name": "shapes_alignment_log", "scorer_dir": seed2}],
      "combine": "mean_minus_std", "lam": 0.5}})
  r = base.build(c.reward, options=c.reward_options, scorer_dir=c.scorer_dir or None)
  assert r.name == "ensemble" and r.differentiable and not r.host
  images, prompts = _shapes_batch()
  a = np.asarray(base.build("shapes_alignment_log")(images, prompts), np.float64)
  b = np.asarray(base.build("shapes_alignment_log", scorer_dir=seed2)(images, prompts),
                 np.float64)
  assert np.abs(a - b).max() > 0.05  # the two reward models disagree
  mean, std = (a + b) / 2, np.abs(a - b) / 2  # two members: σ = |a − b| / 2
  want = mean - 0.5 * std
  np.testing.assert_allclose(r(images, prompts), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(r.fn)(images, prompts), want, rtol=1e-5, atol=1e-5)
  parts = r.parts(images, prompts)
  assert set(parts) == {"ensemble", "ensemble_member0", "ensemble_member1",
                        "ensemble_member_mean", "ensemble_member_std"}
  np.testing.assert_allclose(parts["ensemble"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(parts["ensemble_member0"], a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(parts["ensemble_member1"], b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(parts["ensemble_member_mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(parts["ensemble_member_std"], std, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x: r(x, prompts).sum())(images)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0

  # The same members as the scorer_dir kwarg sends both to seed2: min = the one model.
  same = base.build("ensemble", options={"ensemble": {
      "members": "shapes_alignment_log,shapes_alignment_log", "combine": "min"}},
      scorer_dir=seed2)
  np.testing.assert_allclose(same(images, prompts), b, rtol=1e-5, atol=1e-5)


def test_ensemble_of_host_rewards_with_shaped_member_in_a_weighted_sum():
  x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  x[0] = 0.0
  r = base.build("ensemble:2,brightness:1", options={"ensemble": {
      "members": [{"name": "jpeg_compressibility", "quality": 95},
                  {"name": "jpeg_compressibility", "quality": 30},
                  {"name": "jpeg_compressibility", "shaping": "par", "shaping_reference": -1.0}],
      "combine": "min"}})
  assert r.host and not r.differentiable
  k95, k30 = jpeg.jpeg_size_kb(x, 95), jpeg.jpeg_size_kb(x, 30)
  par = 1 / (1 + np.exp(k95 - 1.0))  # σ(−kb − (−1))
  lum = np.asarray(base.build("brightness")(x, {}))
  want = 2 * np.minimum(np.minimum(-k95, -k30), par) + lum
  got = r(x, {})
  assert isinstance(got, np.ndarray)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  parts = r.parts(x, {})
  assert {"ensemble", "ensemble_member2", "ensemble_member_std", "brightness"} <= set(parts)
  np.testing.assert_allclose(parts["ensemble_member2"], par, rtol=1e-5, atol=1e-6)


def test_ensemble_option_errors():
  def build(**opts):
    return base.build("ensemble", options={"ensemble": opts})

  two = ["saturation", "brightness"]
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.combine='best': "
                                       r"unknown rule; known: \['mean', 'median', 'min'"):
    build(members=two, combine="best")
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.lam=-1"):
    build(members=two, lam=-1)
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.members: an "
                                       r"ensemble needs at least 2 members; got 1"):
    build(members=["saturation"])
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.members: an "
                                       r"ensemble needs at least 2 members; got 0"):
    build()
  with pytest.raises(ValueError, match=r"unknown reward 'nope' in "
                                       r"config\.reward_options\.ensemble\.members\[1\]"):
    build(members=["saturation", "nope"])
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.members\[0\]: "
                                       r"unknown option\(s\) \['bogus'\]"):
    build(members=[{"name": "saturation", "bogus": 1}, "brightness"])
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.members\[1\]="
                                       r".*expected a reward name or a mapping"):
    build(members=["saturation", {"reward": "brightness"}])
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble\.members\[1\]"
                                       r"\.shaping='nope'"):
    build(members=["saturation", {"name": "brightness", "shaping": "nope"}])
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble: unknown "
                                       r"option\(s\) \['combin'\]"):
    build(members=two, combin="min")
  with pytest.raises(ValueError, match=r"config\.reward_options\.ensemble: unknown "
                                       r"option\(s\) \['shared_kwargs'\]"):
    build(members=two, shared_kwargs={})


def test_ensemble_of_text_rewards():
  r = base.build("ensemble", options={"ensemble": {"members": "math_answer,exact_match",
                                                   "combine": "mean_minus_std"}})
  assert r.host and not r.differentiable
  completions = ["4", "so \\boxed{4}", "5"]
  # math_answer [1, 1, 0], exact_match [1, 0, 0]: mean − std = [1, 0.5 − 0.5, 0].
  np.testing.assert_allclose(r(completions, ["4", "4", "4"]), [1.0, 0.0, 0.0], atol=1e-6)
  parts = r.parts(completions, {"answers": ["4", "4", "4"]})
  np.testing.assert_allclose(parts["ensemble_member_std"], [0.0, 0.5, 0.0], atol=1e-6)


def test_evaluation_logs_an_ensembles_members_beside_the_evaluator():
  """The diffusion loop's evaluation metrics (diffusion_rl.reward_eval_metrics): a lone
  ensemble reward judged by an evaluator still logs its members and their mean/std; a
  lone plain reward adds only config_reward."""
  from rft.train import diffusion_rl
  x = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  r = base.build("ensemble", options={"ensemble": {
      "members": "saturation,brightness", "combine": "mean"}})
  assert not r.terms
  got = diffusion_rl.reward_eval_metrics(r, r(x, {}), x, {}, None, judged=True)
  sat = np.asarray(base.build("saturation")(x, {}), np.float64)
  lum = np.asarray(base.build("brightness")(x, {}), np.float64)
  np.testing.assert_allclose(got["config_reward"], np.mean((sat + lum) / 2), rtol=1e-5)
  np.testing.assert_allclose(got["config_reward_ensemble_member_std"],
                             np.mean(np.abs(sat - lum) / 2), rtol=1e-4, atol=1e-6)
  assert {"config_reward_ensemble_member0", "config_reward_ensemble_member1",
          "config_reward_ensemble_member_mean"} <= set(got)
  plain = base.build("brightness")
  assert set(diffusion_rl.reward_eval_metrics(plain, plain(x, {}), x, {}, None,
                                              judged=True)) == {"config_reward"}
  alone = diffusion_rl.reward_eval_metrics(plain, plain(x, {}), x, {}, None, judged=False)
  np.testing.assert_allclose(alone["reward_brightness"], np.mean(lum), rtol=1e-5)
