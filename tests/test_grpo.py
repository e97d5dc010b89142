"""GRPO-family kernels (rft.objectives.grpo) against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.objectives import grpo

EPS = 1e-4
# 3 groups of G=4: one with std sqrt(1/3), one constant, one with std sqrt(20/3).
REWARDS = np.array([1, 0, 0, 1, 3, 3, 3, 3, 0, 2, 4, 6], np.float32)


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64), rtol=0, atol=atol)


# ----------------------------------------------------------------------------- advantages


def test_grpo_group_scaling():
  adv, std = grpo.advantages(REWARDS, 4)
  sa, sc = math.sqrt(1 / 3), math.sqrt(20 / 3)
  _close(std, [sa, 0.0, sc])
  want = [0.5 / (sa + EPS), -0.5 / (sa + EPS), -0.5 / (sa + EPS), 0.5 / (sa + EPS),
          0, 0, 0, 0,
          -3 / (sc + EPS), -1 / (sc + EPS), 1 / (sc + EPS), 3 / (sc + EPS)]
  _close(adv, want)
  assert np.mean(np.asarray(std) == 0) == pytest.approx(1 / 3)  # zero-std group fraction


def test_grpo_batch_scaling_keeps_group_mean():
  # Batch: sum 26, sum of squares 94 -> sum of squared deviations 94 - 26²/12 = 113/3.
  sb = math.sqrt(113 / 3 / 11)
  adv, std = grpo.advantages(REWARDS, 4, "grpo", scale_rewards="batch")
  want = np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -3, -1, 1, 3]) / (sb + EPS)
  _close(adv, want)
  _close(std, [math.sqrt(1 / 3), 0.0, math.sqrt(20 / 3)])  # still per group


def test_grpo_no_scaling_and_dr_grpo():
  want = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -3, -1, 1, 3]
  _close(grpo.advantages(REWARDS, 4, "grpo", scale_rewards="none")[0], want)
  _close(grpo.advantages(REWARDS, 4, "dr_grpo")[0], want)
  with pytest.raises(ValueError, match="dr_grpo"):
    grpo.advantages(REWARDS, 4, "dr_grpo", scale_rewards="group")


def test_rloo_leave_one_out():
  # r_i − mean of the other three.
  want = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0, 0, 0, 0,
          0 - 12 / 3, 2 - 10 / 3, 4 - 8 / 3, 6 - 6 / 3]
  _close(grpo.advantages(REWARDS, 4, "rloo")[0], want)
  sa = math.sqrt(1 / 3)
  adv = grpo.advantages(REWARDS, 4, "rloo", scale_rewards="group")[0]
  _close(adv[:2], [(2 / 3) / (sa + EPS), (-2 / 3) / (sa + EPS)])


def test_advantages_errors():
  with pytest.raises(ValueError, match="nope"):
    grpo.advantages(REWARDS, 4, "nope")
  with pytest.raises(ValueError, match="whole groups"):
    grpo.advantages(REWARDS, 5)
  with pytest.raises(ValueError, match="scale_rewards"):
    grpo.advantages(REWARDS, 4, scale_rewards="global")


# ----------------------------------------------------------------------------- multi-reward


def test_multi_reward_both_orders():
  # 2 groups of 2 completions, 2 rewards with weights (1, 0.5).
  x = np.array([[1, 0], [0, 4], [1, 2], [1, 0]], np.float32)
  w = np.array([1.0, 0.5], np.float32)
  s2 = math.sqrt(2)
  # Sum first: [1, 2 | 2, 1], each group std 1/sqrt(2).
  adv, std = grpo.aggregate(x, w, 2, "sum_then_normalize")
  _close(adv, np.array([-0.5, 0.5, 0.5, -0.5]) / (1 / s2 + EPS))
  _close(std, [1 / s2, 1 / s2])
  # Normalise each reward per group first: reward 1 has stds (1/sqrt2, 0), reward 2 has
  # stds (4/sqrt2, 2/sqrt2); then weighted sum, then batch z-score (sum is already 0-mean).
  n1 = np.array([0.5 / (1 / s2 + EPS), -0.5 / (1 / s2 + EPS), 0, 0])
  n2 = np.array([-2 / (4 / s2 + EPS), 2 / (4 / s2 + EPS), 1 / (s2 + EPS), -1 / (s2 + EPS)])
  s = n1 + 0.5 * n2
  adv2, _ = grpo.aggregate(x, w, 2, "normalize_then_sum")
  _close(adv2, s / (math.sqrt(np.sum(s ** 2) / 3) + EPS))
  # The orders disagree on group 0: reward 2's large scale dominates only the sum.
  _close(adv2, [math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2, -math.sqrt(3) / 2],
         atol=1e-3)
  with pytest.raises(ValueError, match="order"):
    grpo.aggregate(x, w, 2, "mean")
  with pytest.raises(ValueError, match="scale_rewards"):
    grpo.aggregate(x, w, 2, "normalize_then_sum", scale_rewards="group")


# ----------------------------------------------------------------------------- policy loss


def _ones(n, length=1):
  return jnp.ones((n, length), jnp.float32)


def test_clipping_both_signs():
  ratio = np.array([1.5, 1.5, 0.5, 0.5], np.float32)
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  old = jnp.zeros((4, 1))
  lp = jnp.log(jnp.asarray(ratio))[:, None]

  def f(lp):
    return grpo.policy_loss(lp, old, adv, _ones(4), clip_eps=0.2, clip_eps_high=0.28,
                            aggregation="bnpo")

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
  # −min(ρA, clip(ρ)A): 1.5,+ -> −1.28 (clipped); 1.5,− -> 1.5; 0.5,+ -> −0.5; 0.5,− -> 0.8 (clipped)
  _close(loss, (-1.28 + 1.5 - 0.5 + 0.8) / 4)
  # dρ/dlp = ρ; clipped tokens get no gradient.
  _close(g[:, 0], [0.0, 1.5 / 4, -0.5 / 4, 0.0])
  _close([m["clip_ratio_low"], m["clip_ratio_high"], m["clip_ratio"], m["ratio_mean"]],
         [0.25, 0.25, 0.5, 1.0])


def test_clip_higher():
  lp = jnp.full((1, 1), math.log(1.25))
  old = jnp.zeros((1, 1))
  adv = jnp.ones(1)
  sym, ms = grpo.policy_loss(lp, old, adv, _ones(1), clip_eps=0.2)
  dapo, md = grpo.policy_loss(lp, old, adv, _ones(1), clip_eps=0.2, clip_eps_high=0.28)
  _close(sym, -1.2)
  _close(dapo, -1.25)
  assert float(ms["clip_ratio_high"]) == 1.0 and float(md["clip_ratio_high"]) == 0.0


# mask [[1,1,0],[1,0,0]], ratio 1, A = (2, −1): token losses −2, −2 | 1.
AGG_CASES = [
    ("grpo", {}, (-4 / 2 + 1 / 1) / 2),
    ("bnpo", {}, (-4 + 1) / 3),
    ("dr_grpo", {}, -3 / (2 * 3)),
    ("dr_grpo", {"max_len": 10}, -3 / (2 * 10)),
    ("dapo", {}, -3 / 3),
    ("dapo", {"num_tokens_total": 6}, -3 / 6),
]


@pytest.mark.parametrize("aggregation,kw,want", AGG_CASES)
def test_aggregations(aggregation, kw, want):
  lp = jnp.array([[-1.0, -2.0, jnp.nan], [-0.5, 7.0, jnp.nan]])  # padding may be anything
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
  loss, m = grpo.policy_loss(lp, lp, jnp.array([2.0, -1.0]), mask, aggregation=aggregation, **kw)
  _close(loss, want)
  assert float(m["ratio_mean"]) == 1.0 and float(m["clip_ratio"]) == 0.0


def test_aggregation_argument_errors():
  lp = jnp.zeros((2, 3))
  adv = jnp.array([1.0, -2.0])
  # max_len describes the data and is only read by dr_grpo: harmless elsewhere.
  for agg in ("grpo", "bnpo", "dapo"):
    _close(grpo.policy_loss(lp, lp, adv, _ones(2, 3), aggregation=agg, max_len=9)[0],
           grpo.policy_loss(lp, lp, adv, _ones(2, 3), aggregation=agg)[0])
  with pytest.raises(ValueError, match="num_tokens_total"):
    grpo.policy_loss(lp, lp, jnp.ones(2), _ones(2, 3), aggregation="bnpo", num_tokens_total=5)
  with pytest.raises(ValueError, match="aggregation"):
    grpo.policy_loss(lp, lp, jnp.ones(2), _ones(2, 3), aggregation="sum")
  with pytest.raises(ValueError, match="importance"):
    grpo.policy_loss(lp, lp, jnp.ones(2), _ones(2, 3), importance="tok")


def test_gspo_sequence_ratio_and_gradient():
  # Sequence 0: log ratios (0.1, 0.2, 0.3) -> s0 = e^0.2; sequence 1: (−0.1, −0.3, pad) -> s1 = e^−0.2.
  old = jnp.zeros((2, 3))
  lp = jnp.array([[0.1, 0.2, 0.3], [-0.1, -0.3, 5.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
  adv = jnp.ones(2)
  s0, s1 = math.exp(0.2), math.exp(-0.2)

  def f(lp, **kw):
    return grpo.policy_loss(lp, old, adv, mask, importance="sequence", **kw)

  (loss, m), g = jax.value_and_grad(lambda x: f(x, clip_eps=0.5), has_aux=True)(lp)
  _close(loss, -(s0 + s1) / 2)
  _close(m["ratio_mean"], (3 * s0 + 2 * s1) / 5)
  # GSPO: every token of sequence i gets s_i · A_i / (N |y_i|).
  _close(g, [[-s0 / 6] * 3, [-s1 / 4, -s1 / 4, 0.0]])
  # With the paper's clip range sequence 0 (s0 > 1 + 4e-4, A > 0) is clipped as a whole;
  # sequence 1 (s1 < 1, A > 0) is not.
  (loss, m), g = jax.value_and_grad(
      lambda x: f(x, clip_eps=3e-4, clip_eps_high=4e-4), has_aux=True)(lp)
  _close(loss, (-(1 + 4e-4) - s1) / 2)
  _close(g, [[0.0] * 3, [-s1 / 4, -s1 / 4, 0.0]])
  _close([m["clip_ratio_high"], m["clip_ratio_low"]], [3 / 5, 0.0])
  adv2 = jnp.array([1.0, -1.0])
  loss, m = grpo.policy_loss(lp, old, adv2, mask, **{
      k: v for k, v in grpo.preset("gspo").items() if k not in grpo.ADVANTAGE_KEYS})
  _close(loss, (-(1 + 4e-4) + (1 - 3e-4)) / 2)
  _close([m["clip_ratio_high"], m["clip_ratio_low"]], [3 / 5, 2 / 5])


def test_kl_estimators():
  lp = jnp.array([[-1.0], [-2.0]])
  ref = jnp.array([[-2.0], [-1.0]])
  _close(grpo.kl_estimate(lp, ref, "k1")[:, 0], [1.0, -1.0])
  _close(grpo.kl_estimate(lp, ref, "k3")[:, 0], [math.exp(-1), math.e - 2])
  for est, kl in (("k1", [1.0, -1.0]), ("k3", [math.exp(-1), math.e - 2])):
    loss, m = grpo.policy_loss(lp, lp, jnp.zeros(2), _ones(2), ref_log_probs=ref, beta=0.5,
                               kl_estimator=est)
    _close(loss, 0.5 * np.mean(kl))
    _close(m["kl"], np.mean(kl))
  with pytest.raises(ValueError, match="kl_estimator"):
    grpo.kl_estimate(lp, ref, "k2")


def test_beta_zero_needs_no_reference():
  lp = jnp.zeros((2, 3))
  loss, m = grpo.policy_loss(lp, lp, jnp.array([1.0, -1.0]), _ones(2, 3), beta=0.0)
  assert "kl" not in m and np.isfinite(float(loss))
  with pytest.raises(ValueError, match="ref_log_probs"):
    grpo.policy_loss(lp, lp, jnp.ones(2), _ones(2, 3), beta=0.1)


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_at_ratio_one_is_reinforce(importance, aggregation):
  r = np.random.default_rng(0)
  n, length = 4, 5
  lp = jnp.asarray(r.normal(size=(n, length)) - 2.0, jnp.float32)
  mask = np.ones((n, length), np.float32)
  mask[0, 3:] = 0
  mask[2, 1:] = 0
  adv = np.array([1.3, -0.7, 0.4, -1.0], np.float32)
  ref = lp  # KL term with k3 has zero gradient at lp = ref
  g = jax.grad(lambda x: grpo.policy_loss(
      x, lp, jnp.asarray(adv), jnp.asarray(mask), importance=importance, aggregation=aggregation,
      beta=0.1, ref_log_probs=ref)[0])(lp)
  lengths = mask.sum(1)
  scale = {"grpo": 1 / (n * lengths)[:, None], "bnpo": 1 / mask.sum(),
           "dr_grpo": 1 / (n * length), "dapo": 1 / mask.sum()}[aggregation]
  _close(g, -adv[:, None] * mask * scale, atol=1e-6)


def test_presets():
  p = grpo.preset("dapo")
  assert (p["clip_eps"], p["clip_eps_high"], p["aggregation"], p["beta"], p["advantage"]) == (
      0.2, 0.28, "dapo", 0.0, "grpo")
  p["clip_eps"] = 1.0
  assert grpo.LOSSES["dapo"]["clip_eps"] == 0.2  # a copy
  assert grpo.preset("dr_grpo")["advantage"] == "dr_grpo"
  assert grpo.preset("gspo")["importance"] == "sequence"
  lp = jnp.zeros((2, 3))
  rewards = jnp.array([0.0, 1.0])
  want_adv = {"dr_grpo": [-0.5, 0.5]}  # the others scale by the group std 1/sqrt(2)
  for name in grpo.LOSSES:
    kw = grpo.preset(name)
    adv, _ = grpo.advantages(rewards, 2, kw.pop("advantage"), kw.pop("scale_rewards"))
    _close(adv, want_adv.get(name, np.array([-0.5, 0.5]) / (1 / math.sqrt(2) + EPS)))
    loss, _ = grpo.policy_loss(lp, lp, adv, _ones(2, 3), **kw)
    assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match="nope.*gspo"):
    grpo.preset("nope")


# ----------------------------------------------------------------------------- DAPO helpers


def test_dynamic_sampling_keep():
  r = np.array([1, 1, 1, 0, 1, 0, 2, 2, 2, 0.5, 0.5, 0.4])
  assert np.asarray(grpo.dynamic_sampling_keep(r, 3)).tolist() == [False, True, False, True]


ROUNDS = [  # G = 2, 3 groups a round; kept groups: 1, then 2, then 3
    [1, 1, 0, 1, 0, 0],
    [0, 1, 1, 0, 1, 1],
    [1, 0, 0, 1, 0, 1],
]


def _generate(rounds):
  def generate(k):
    rewards = np.array(rounds[k % len(rounds)], np.float32)
    ids = 100 * k + np.arange(6)
    return rewards, {"id": ids, "tokens": np.stack([ids, -ids], 1)}
  return generate


def test_fill_batch_reaches_fixed_size():
  b, info = grpo.fill_batch(_generate(ROUNDS), 2, 4)
  assert info["complete"] and info["num_groups"] == 4 and info["rounds"] == 3
  assert (info["generated_groups"], info["kept_groups"], info["kept_fraction"]) == (9, 6, 6 / 9)
  assert b["id"].tolist() == [2, 3, 100, 101, 102, 103, 200, 201]
  assert b["tokens"].shape == (8, 2)
  np.testing.assert_array_equal(b["tokens"][:, 1], -b["id"])
  assert info["rewards"].tolist() == [0, 1, 0, 1, 1, 0, 1, 0]
  assert np.all(np.asarray(grpo.dynamic_sampling_keep(info["rewards"], 2)))


def test_fill_batch_max_rounds_and_sampler_stats():
  b, info = grpo.fill_batch(_generate(ROUNDS), group_size=2, target_groups=4, max_rounds=2)
  assert not info["complete"] and info["num_groups"] == 3 and b["id"].shape == (6,)
  b, info = grpo.fill_batch(_generate([[1, 1, 0, 0, 2, 2]]), group_size=2, target_groups=1,
                            max_rounds=3)
  assert (info["num_groups"], info["rounds"], info["complete"]) == (0, 3, False)
  assert b["tokens"].shape == (0, 2) and info["rewards"].shape == (0,)
  sampler = grpo.DynamicSampler(group_size=2, target_groups=2, max_rounds=4)
  for _ in range(2):
    assert sampler.fill(_generate(ROUNDS))[0]["id"].shape == (4,)
  st = sampler.stats()
  # Each fill: round 0 keeps 1, round 1 keeps 2 -> 2 rounds, 6 generated, 3 kept.
  assert (st["batches"], st["rounds"], st["generated_groups"], st["kept_groups"]) == (2, 4, 12, 6)
  assert st["kept_fraction"] == 0.5 and st["incomplete"] == 0


def test_fill_batch_checks_payload():
  def bad(k):
    return np.array([0.0, 1.0]), {"tokens": np.zeros((3, 2))}
  with pytest.raises(ValueError, match="tokens"):
    grpo.fill_batch(bad, 2, 1)


def test_overlong():
  got = grpo.soft_overlong_punishment([10, 16, 17, 18, 20, 21, 30], max_len=20, cache_len=4)
  _close(got, [0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
  _close(grpo.overlong_filter_mask(np.array([True, False, True])), [0, 1, 0])
  with pytest.raises(ValueError, match="cache_len"):
    grpo.soft_overlong_punishment([1], max_len=4, cache_len=0)


# ----------------------------------------------------------------------------- RAFT


def test_raft_select_and_sft_loss():
  r = [0.1, 0.9, 0.9, 0.2, 0.5, 0.4, 0.6, 0.6]
  assert grpo.raft_select(r, 4).tolist() == [1, 6]
  assert grpo.raft_select(r, 4, keep=2).tolist() == [1, 2, 6, 7]
  lp = jnp.array([[-1.0, -2.0, jnp.nan], [-3.0, 0.5, 0.5]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  _close(grpo.sft_loss(lp, mask), 2.0)
