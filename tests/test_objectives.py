"""Tests for rft.objectives: PRDP (rdp_loss), DDPO (ddpo_step_loss, PerPromptStatTracker)
and RAFT (select_top), against hand-computed numpy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rft.objectives import ddpo, prdp, raft


def _rng(seed):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- PRDP

def _rdp_reference(lp, old, ref, rewards, group_size, beta, clip_eps, reduce,
                   drop_ties=False):
  """Explicit loops over the pairs i < j of every group: (loss, pairs, branches).

  branches: per pair, True where the clipped pair loss is strictly larger (chosen)."""
  lp, old, ref, rewards = (np.asarray(x, np.float64) for x in (lp, old, ref, rewards))
  agg = np.mean if reduce == "mean" else np.sum
  n = lp.shape[0]
  losses, branches = [], []
  for g in range(n // group_size):
    idx = range(g * group_size, (g + 1) * group_size)
    for i, j in itertools.combinations(idx, 2):
      if drop_ties and rewards[i] == rewards[j]:
        continue
      target = (rewards[i] - rewards[j]) / beta
      rh_i, rh_j = agg(lp[i] - ref[i]), agg(lp[j] - ref[j])
      unclipped = (rh_i - rh_j - target) ** 2
      if clip_eps is None:
        losses.append(unclipped)
        continue

      def clipped_rhat(k):
        old_ratio = old[k] - ref[k]
        return agg(old_ratio + np.clip((lp[k] - ref[k]) - old_ratio, -clip_eps, clip_eps))

      clipped = (clipped_rhat(i) - clipped_rhat(j) - target) ** 2
      losses.append(max(unclipped, clipped))
      branches.append(clipped > unclipped)
  return float(np.mean(losses)) if losses else 0.0, len(losses), branches


def _rdp_inputs(n, T, seed, spread=0.3):
  r = _rng(seed)
  ref = r.normal(size=(n, T)) - 3.0
  old = ref + 0.2 * r.normal(size=(n, T))
  lp = old + spread * r.normal(size=(n, T))
  rewards = r.normal(size=(n,))
  return lp, old, ref, rewards


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("n,group_size", [(4, 2), (3, 3), (6, 3)])
def test_rdp_loss_matches_hand_computation(reduce, n, group_size):
  lp, old, ref, rewards = _rdp_inputs(n, 2, seed=n + group_size)
  beta = 0.7
  loss, m = prdp.rdp_loss(*_f32(lp, old, ref, rewards), group_size=group_size, beta=beta,
                         clip_eps=None, reduce=reduce)
  want, pairs, _ = _rdp_reference(lp, old, ref, rewards, group_size, beta, None, reduce)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  assert pairs == (n // group_size) * group_size * (group_size - 1) // 2
  assert float(m["pairs"]) == pairs
  assert float(m["clip_frac"]) == 0.0
  np.testing.assert_allclose(float(m["log_ratio_to_old"]), np.mean(lp - old), rtol=1e-5)


def test_rdp_loss_tiny_explicit_numbers():
  # One group of 2, T=2, ref = 0: r̂ = mean(lp) = [1, -0.5] (sum: [2, -1]).
  lp = np.array([[0.5, 1.5], [-1.0, 0.0]])
  zeros = np.zeros_like(lp)
  rewards = np.array([1.0, 0.0])
  for reduce, gap in [("mean", 1.5), ("sum", 3.0)]:
    loss, m = prdp.rdp_loss(*_f32(lp, zeros, zeros, rewards), group_size=2, beta=0.5,
                           clip_eps=None, reduce=reduce)
    # target = (1 - 0) / 0.5 = 2
    np.testing.assert_allclose(float(loss), (gap - 2.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(m["implicit_reward_gap"]), gap, rtol=1e-6)
    np.testing.assert_allclose(float(m["target_gap"]), 2.0, rtol=1e-6)


def test_rdp_loss_gradient_unclipped_matches_analytic():
  n, T, G, beta = 6, 3, 3, 0.5
  lp, old, ref, rewards = _rdp_inputs(n, T, seed=11)
  grad = jax.grad(lambda x: prdp.rdp_loss(x, *_f32(old, ref, rewards), group_size=G, beta=beta,
                                         clip_eps=None, reduce="mean")[0])(
                                             jnp.asarray(lp, jnp.float32))
  want = np.zeros((n, T))
  rh = np.mean(lp - ref, axis=1)
  pairs = list(itertools.chain.from_iterable(
      itertools.combinations(range(g * G, (g + 1) * G), 2) for g in range(n // G)))
  for i, j in pairs:
    e = rh[i] - rh[j] - (rewards[i] - rewards[j]) / beta
    want[i] += 2 * e / T / len(pairs)
    want[j] -= 2 * e / T / len(pairs)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_rdp_loss_clipped_matches_hand_computation(reduce):
  n, T, G, beta, eps = 8, 2, 4, 0.5, 0.2
  lp, old, ref, rewards = _rdp_inputs(n, T, seed=5, spread=0.5)
  assert np.any(np.abs(lp - old) > eps) and np.any(np.abs(lp - old) < eps)
  loss, m = prdp.rdp_loss(*_f32(lp, old, ref, rewards), group_size=G, beta=beta,
                         clip_eps=eps, reduce=reduce)
  want, pairs, branches = _rdp_reference(lp, old, ref, rewards, G, beta, eps, reduce)
  # The case exercises both branches of the max.
  assert any(branches) and not all(branches)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  unclipped, _, _ = _rdp_reference(lp, old, ref, rewards, G, beta, None, reduce)
  assert want > unclipped  # the pessimistic max actually changed the loss
  assert float(m["pairs"]) == pairs == 12
  np.testing.assert_allclose(float(m["clip_frac"]), np.mean(np.abs(lp - old) > eps), rtol=1e-6)


def _clip_case(reward_gap):
  """Two groups of 2, T=2, eps=0.2, beta=1. Group 0: sample 0 has every step clipped
  (lp - old = +1), sample 1 none. With reward_gap = r0 - r1 = 2 the target is 2, the
  clipped pair loss (0.2 - 0 - 2)² = 3.24 beats the unclipped (1 - 0 - 2)² = 1; with
  reward_gap = -2 the unclipped one (3²) beats the clipped (2.2²)."""
  old = np.array([[-1.0, -2.0], [-1.5, -0.5], [-1.0, -1.0], [-2.0, -1.5]])
  ref = old.copy()
  ref[2:] += np.array([[0.1, -0.2], [0.3, 0.0]])
  lp = old + np.array([[1.0, 1.0], [0.05, -0.05], [0.1, -0.3], [0.0, 0.15]])
  rewards = np.array([reward_gap, 0.0, 0.3, -0.4])
  return lp, old, ref, rewards


def _clip_grad(lp, old, ref, rewards):
  fn = lambda x: prdp.rdp_loss(x, *_f32(old, ref, rewards), group_size=2, beta=1.0,
                              clip_eps=0.2, reduce="mean")
  (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp, jnp.float32))
  return float(loss), m, np.asarray(g)


def test_rdp_clipped_gradient_zero_for_fully_clipped_sample():
  lp, old, ref, rewards = _clip_case(2.0)
  loss, m, g = _clip_grad(lp, old, ref, rewards)
  want, _, branches = _rdp_reference(lp, old, ref, rewards, 2, 1.0, 0.2, "mean")
  assert branches[0]  # group 0's only pair takes the clipped branch
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(loss, (3.24 + _rdp_reference(
      lp[2:], old[2:], ref[2:], rewards[2:], 2, 1.0, 0.2, "mean")[0]) / 2, rtol=1e-5)
  np.testing.assert_array_equal(g[0], 0.0)
  assert np.all(np.abs(g[1]) > 1e-4)  # its partner is inside the clip range
  assert np.all(np.abs(g[2:]) > 1e-4)
  # clip_frac: the two steps of sample 0 and step 1 of sample 2 (|-0.3| > 0.2) out of 8.
  np.testing.assert_allclose(float(m["clip_frac"]), 3 / 8, rtol=1e-6)


def test_rdp_clipped_gradient_nonzero_when_unclipped_branch_wins():
  lp, old, ref, rewards = _clip_case(-2.0)
  loss, _, g = _clip_grad(lp, old, ref, rewards)
  want, _, branches = _rdp_reference(lp, old, ref, rewards, 2, 1.0, 0.2, "mean")
  assert not branches[0]
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Unclipped branch: dL/dlp[0, t] = 2 · (1 - 0 + 2) · (1/T) / pairs = 2·3·0.5/2 = 1.5
  np.testing.assert_allclose(g[0], [1.5, 1.5], rtol=1e-5)


def test_rdp_drop_ties():
  n, T = 8, 2
  lp, old, ref, _ = _rdp_inputs(n, T, seed=3)
  rewards = np.array([1.0, 1.0, 1.0, 2.0, 0.5, -0.5, 0.3, 0.3])  # groups of 4
  kw = dict(group_size=4, beta=0.5, clip_eps=None, reduce="mean")
  _, m_all = prdp.rdp_loss(*_f32(lp, old, ref, rewards), **kw)
  loss, m = prdp.rdp_loss(*_f32(lp, old, ref, rewards), drop_ties=True, **kw)
  assert float(m_all["pairs"]) == 12
  # group 0 loses its 3 tied pairs (of 6), group 1 its 1 tied pair.
  assert float(m["pairs"]) == 8
  want, pairs, _ = _rdp_reference(lp, old, ref, rewards, 4, 0.5, None, "mean", drop_ties=True)
  assert pairs == 8
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert abs(float(loss) - float(m_all["loss"])) > 1e-3


def test_rdp_errors():
  lp, old, ref, rewards = _rdp_inputs(5, 2, seed=0)
  with pytest.raises(ValueError):
    prdp.rdp_loss(*_f32(lp, old, ref, rewards), group_size=2, beta=1.0, clip_eps=None)
  lp, old, ref, rewards = _rdp_inputs(4, 2, seed=0)
  with pytest.raises(ValueError):
    prdp.rdp_loss(*_f32(lp, old, ref, rewards), group_size=2, beta=1.0, clip_eps=None,
                 reduce="max")


# --------------------------------------------------------------- RDP optimum (Thm 4.1)

M, BETA = 5, 0.5


def _bandit():
  r = _rng(42)
  theta_ref = jnp.asarray(r.normal(size=M), jnp.float32)
  rewards = jnp.asarray(2.0 * r.normal(size=M), jnp.float32)
  optimum = jax.nn.softmax(theta_ref + rewards / BETA)
  return theta_ref, rewards, optimum


def _kl(theta, target):
  p = jax.nn.softmax(theta)
  return float(jnp.sum(p * (jnp.log(p) - jnp.log(target))))


def test_rdp_exact_minimiser_is_kl_regularised_optimum():
  theta_ref, rewards, optimum = _bandit()
  ref_lp = jax.nn.log_softmax(theta_ref)[:, None]
  tx = optax.adam(0.05)

  def loss_fn(theta):
    lp = jax.nn.log_softmax(theta)[:, None]  # all M outcomes as one group, T = 1
    return prdp.rdp_loss(lp, lp, ref_lp, rewards, group_size=M, beta=BETA, clip_eps=None)[0]

  @jax.jit
  def train(theta):
    def step(carry, _):
      theta, opt = carry
      g = jax.grad(loss_fn)(theta)
      upd, opt = tx.update(g, opt)
      return (optax.apply_updates(theta, upd), opt), None
    (theta, _), _ = jax.lax.scan(step, (theta, tx.init(theta)), None, length=2000)
    return theta

  theta0 = jnp.zeros(M, jnp.float32)
  assert float(jnp.max(jnp.abs(jax.nn.softmax(theta0) - optimum))) > 0.05
  theta = train(theta0)
  assert float(loss_fn(theta)) < 1e-6
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(theta)), np.asarray(optimum), atol=1e-3)


def _online_kl(clip_eps):
  """Algorithm 1 on a bandit: each epoch sample B=8 outcomes for 4 prompts from π_old,
  then K Adam steps on rdp_loss of the samples' log-probs. (KL at init, KL at the end)."""
  theta_ref, rewards, optimum = _bandit()
  P, B, K, EPOCHS = 4, 8, 4, 300
  tx = optax.adam(0.05)

  def loss_fn(theta, idx, old_lp):
    lp = jax.nn.log_softmax(theta)[idx][:, None]
    ref = jax.nn.log_softmax(theta_ref)[idx][:, None]
    return prdp.rdp_loss(lp, old_lp, ref, rewards[idx], group_size=B, beta=BETA,
                        clip_eps=clip_eps)[0]

  @jax.jit
  def train(theta, key):
    def epoch(carry, key):
      theta, opt = carry
      idx = jax.random.categorical(key, theta, shape=(P * B,))
      old_lp = jax.nn.log_softmax(theta)[idx][:, None]

      def inner(carry, _):
        theta, opt = carry
        g = jax.grad(loss_fn)(theta, idx, old_lp)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(theta, upd), opt), None
      return jax.lax.scan(inner, (theta, opt), None, length=K)[0], None
    (theta, _), _ = jax.lax.scan(epoch, (theta, tx.init(theta)),
                                 jax.random.split(key, EPOCHS))
    return theta

  return _kl(theta_ref, optimum), _kl(train(theta_ref, jax.random.key(0)), optimum)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_rdp_online_converges_to_optimum(clip_eps):
  kl0, kl = _online_kl(clip_eps)
  assert kl0 > 0.5, kl0
  assert kl < 0.05, (kl0, kl)


# ----------------------------------------------------------------------------- DDPO

def test_ddpo_importance_sampled_loss_hand_values():
  ratio = np.array([1.5, 1.5, 0.5, 0.5, 1.1])
  adv = np.array([1.0, -1.0, 1.0, -10.0, 2.0])  # -10 is clipped to -5
  old = np.array([-3.0, -1.0, -2.0, -4.0, -0.5])
  lp = old + np.log(ratio)
  loss, m = ddpo.ddpo_step_loss(*_f32(lp, old, adv), clip_range=0.2, adv_clip_max=5.0,
                                importance_sampling=True)
  # per sample max(-A ρ, -A clip(ρ, 0.8, 1.2)):
  #   max(-1.5, -1.2) = -1.2;  max(1.5, 1.2) = 1.5;  max(-0.5, -0.8) = -0.5;
  #   max(2.5, 4.0) = 4.0 (A = -5);  max(-2.2, -2.2) = -2.2  -> mean 1.6 / 5
  np.testing.assert_allclose(float(loss), 0.32, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), 0.32, rtol=1e-5)
  np.testing.assert_allclose(float(m["approx_kl"]), 0.5 * np.mean(np.log(ratio) ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["clip_frac"]), 0.8, rtol=1e-6)  # all but ρ = 1.1
  np.testing.assert_allclose(float(m["ratio"]), np.mean(ratio), rtol=1e-5)


def test_ddpo_score_function_loss_hand_values():
  lp = np.array([-1.0, -2.0, -0.5, -4.0])
  old = lp + np.array([0.3, -0.1, 0.0, 0.2])
  adv = np.array([2.0, -1.0, 7.0, -0.5])  # 7 is clipped to 3
  loss, m = ddpo.ddpo_step_loss(*_f32(lp, old, adv), clip_range=0.2, adv_clip_max=3.0,
                                importance_sampling=False)
  # -mean(A lp) = -(−2 + 2 − 1.5 + 2) / 4 = -0.125
  np.testing.assert_allclose(float(loss), -0.125, rtol=1e-5)
  np.testing.assert_allclose(float(m["approx_kl"]), 0.5 * np.mean([0.09, 0.01, 0.0, 0.04]),
                             rtol=1e-5)
  # |ρ - 1| > 0.2 only for lp - old = -0.3 (ρ = 0.741)
  np.testing.assert_allclose(float(m["clip_frac"]), 0.25, rtol=1e-6)


def test_ddpo_is_gradient_at_old_equals_score_function_gradient():
  lp = jnp.asarray([-1.0, -2.0, -0.5, -4.0, -3.0], jnp.float32)
  adv = jnp.asarray([2.0, -1.0, 7.0, -0.5, 0.0], jnp.float32)
  grads = {}
  for is_ in (True, False):
    grads[is_] = np.asarray(jax.grad(lambda x: ddpo.ddpo_step_loss(
        x, lp, adv, clip_range=0.2, adv_clip_max=3.0, importance_sampling=is_)[0])(lp))
  want = -np.clip(np.asarray(adv), -3.0, 3.0) / 5
  np.testing.assert_allclose(grads[True], want, rtol=1e-6)
  np.testing.assert_allclose(grads[False], want, rtol=1e-6)


def test_ddpo_is_gradient_zero_when_clipped_branch_chosen():
  old = jnp.zeros(2, jnp.float32)
  lp = jnp.log(jnp.asarray([1.5, 0.5], jnp.float32))
  adv = jnp.asarray([1.0, -1.0], jnp.float32)  # ρ > 1+ε with A > 0; ρ < 1-ε with A < 0
  g = jax.grad(lambda x: ddpo.ddpo_step_loss(x, old, adv, clip_range=0.2, adv_clip_max=5.0)[0])(lp)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------- per-prompt statistics

def _adv(x, mean, std):
  return (np.asarray(x, np.float32) - mean) / (std + 1e-6)


def test_stat_tracker_batch_then_prompt_statistics():
  t = ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=3)
  # Batch 1: every prompt holds 2 < 3 rewards -> batch mean 2.5, std sqrt(1.25).
  a1 = t.update(np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 3.0, 4.0]))
  assert a1.dtype == np.float32
  np.testing.assert_allclose(a1, _adv([1, 2, 3, 4], 2.5, np.sqrt(1.25)), rtol=1e-5)
  # Batch 2: prompt 0 holds [1, 2, 3] (mean 2, std sqrt(2/3)); prompt 1 holds
  # [3, 4, 10, 0] (mean 4.25, std sqrt(13.1875)).
  a2 = t.update(np.array([0, 1, 1]), np.array([3.0, 10.0, 0.0]))
  np.testing.assert_allclose(a2[0], _adv(3.0, 2.0, np.sqrt(2 / 3)), rtol=1e-5)
  np.testing.assert_allclose(a2[1:], _adv([10.0, 0.0], 4.25, np.sqrt(13.1875)), rtol=1e-5)
  # Batch 3: prompt 1's ring drops its oldest reward 3 -> [4, 10, 0, 5] (mean 4.75,
  # std sqrt(12.6875)); prompt 2 is new (1 reward) -> batch [5, 7]: mean 6, std 1.
  a3 = t.update(np.array([1, 2]), np.array([5.0, 7.0]))
  np.testing.assert_allclose(a3[0], _adv(5.0, 4.75, np.sqrt(12.6875)), rtol=1e-5)
  np.testing.assert_allclose(a3[1], _adv(7.0, 6.0, 1.0), rtol=1e-5)
  np.testing.assert_array_equal(t.count, [3, 5, 1])
  np.testing.assert_array_equal(t.values[1], [5.0, 4.0, 10.0, 0.0])
  assert t.stats() == {"prompts_seen": 3, "mean_count": pytest.approx((3 + 4 + 1) / 3)}


def test_stat_tracker_ring_buffer_keeps_last_rewards():
  t = ddpo.PerPromptStatTracker(num_prompts=1, buffer_size=3, min_count=1)
  t.update(np.zeros(5, int), np.arange(5.0))  # keeps 2, 3, 4
  assert sorted(t.values[0].tolist()) == [2.0, 3.0, 4.0]
  a = t.update(np.zeros(1, int), np.array([10.0]))  # keeps 3, 4, 10
  held = np.array([3.0, 4.0, 10.0])
  np.testing.assert_allclose(a, _adv(10.0, held.mean(), held.std()), rtol=1e-5)


def test_stat_tracker_state_round_trip():
  t = ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=3)
  t.update(np.array([0, 0, 1, 1, 2]), np.array([1.0, 2.0, 3.0, 4.0, 0.5]))
  t.update(np.array([0, 1, 2]), np.array([3.0, 10.0, -1.0]))
  saved = {k: np.array(v) for k, v in t.state().items()}  # as a checkpoint would hold it
  ids, rewards = np.array([0, 1, 2, 2]), np.array([2.5, 1.0, 0.0, 3.0])
  expected = t.update(ids, rewards)

  t2 = ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=3)
  t2.load_state({"values": saved["values"].astype(np.float64), "count": saved["count"]})
  np.testing.assert_array_equal(t2.update(ids, rewards), expected)
  fresh = ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=3)
  assert not np.allclose(fresh.update(ids, rewards), expected)  # the state matters


def test_stat_tracker_errors():
  t = ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=3)
  with pytest.raises(ValueError):
    t.load_state({"values": np.zeros((3, 5)), "count": np.zeros(3)})
  with pytest.raises(ValueError):
    t.load_state({"values": np.zeros((2, 4)), "count": np.zeros(2)})
  with pytest.raises(ValueError):
    ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=5)
  ddpo.PerPromptStatTracker(num_prompts=3, buffer_size=4, min_count=4)  # equal is fine


def test_batch_advantages():
  np.testing.assert_allclose(ddpo.batch_advantages([1.0, 3.0]), [-1.0, 1.0], rtol=1e-5)


# ----------------------------------------------------------------------------- RAFT

def test_select_top_hand_examples():
  rewards = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.2])  # groups of 3
  np.testing.assert_array_equal(raft.select_top(rewards, 3, 1), [1, 3])  # tie -> earlier
  np.testing.assert_array_equal(raft.select_top(rewards, 3, 2), [1, 2, 3, 4])  # best first
  np.testing.assert_array_equal(raft.select_top(rewards, 3, 3), [1, 2, 0, 3, 4, 5])
  np.testing.assert_array_equal(raft.select_top([0.5, 0.9, 0.1, 0.2], 2, 1), [1, 3])
  np.testing.assert_array_equal(raft.select_top([2.0, 2.0, 2.0, 1.0], 4, 2), [0, 1])
  np.testing.assert_array_equal(raft.select_top([-1.0, 0.0, -3.0], 3, 2), [1, 0])
  # Many ties in a large group (where an unstable sort would reorder them).
  big = np.tile([1.0, 0.0, 1.0, 2.0], 50)  # 2.0 at 3, 7, 11, ...; 1.0 at 0, 2, 4, ...
  np.testing.assert_array_equal(raft.select_top(np.concatenate([big, big]), 200, 60),
                                [*range(3, 200, 4), 0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                 *range(203, 400, 4), 200, 202, 204, 206, 208, 210, 212,
                                 214, 216, 218])


def test_select_top_errors():
  with pytest.raises(ValueError):
    raft.select_top(np.zeros(5), 3, 1)
  with pytest.raises(ValueError):
    raft.select_top(np.zeros(6), 3, 0)
  with pytest.raises(ValueError):
    raft.select_top(np.zeros(6), 3, 4)
