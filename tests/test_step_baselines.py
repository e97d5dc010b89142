"""Per-step baselines (rft/objectives/step_baselines.py and rdp_loss(step_baselines=)):
hand values, the gradient they add, and on a Gaussian chain with a known value function:
the same expected gradient with less variance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.objectives import ddpo, prdp, step_baselines


def test_zero_baselines_give_the_plain_loss_and_gradient():
  rng = np.random.default_rng(0)
  lp, old, ref = (jnp.asarray(rng.normal(size=(8, 5)) * 0.01, jnp.float32) for _ in range(3))
  r = jnp.asarray(rng.uniform(size=8), jnp.float32)
  kw = dict(group_size=4, beta=0.1, clip_eps=1e-3, reduce="mean")
  f = lambda lp_, b: prdp.rdp_loss(lp_, old, ref, r, step_baselines=b, **kw)[0]
  plain = lambda lp_: prdp.rdp_loss(lp_, old, ref, r, **kw)[0]
  np.testing.assert_allclose(f(lp, jnp.zeros_like(lp)), plain(lp), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(lp, jnp.zeros_like(lp)), jax.grad(plain)(lp),
                             rtol=1e-5, atol=1e-7)
  # A baseline constant within each group and step changes nothing either.
  const = jnp.repeat(jnp.asarray(rng.normal(size=(2, 1, 5)), jnp.float32), 4, axis=1).reshape(8, 5)
  np.testing.assert_allclose(jax.grad(f)(lp, const), jax.grad(plain)(lp), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_baseline_gradient_is_the_hand_formula(reduce):
  """Unclipped: d/d lp[i,t] gains (2 / beta) * agg'(t) * sum_{j in group} (b[i,t] - b[j,t])
  / (number of pairs)."""
  rng = np.random.default_rng(1)
  B, G, T, beta = 3, 2, 4, 0.5
  lp, ref = (jnp.asarray(rng.normal(size=(G * B, T)), jnp.float32) for _ in range(2))
  r = jnp.asarray(rng.uniform(size=G * B), jnp.float32)
  b = rng.normal(size=(G * B, T)).astype(np.float32)
  kw = dict(group_size=B, beta=beta, clip_eps=None, reduce=reduce)
  g_cv = jax.grad(lambda x: prdp.rdp_loss(x, lp, ref, r, step_baselines=jnp.asarray(b), **kw)[0])(lp)
  g0 = jax.grad(lambda x: prdp.rdp_loss(x, lp, ref, r, **kw)[0])(lp)
  pairs = G * B * (B - 1) / 2
  per_step = 1.0 / T if reduce == "mean" else 1.0
  bg = b.reshape(G, B, T)
  want = (2 / beta) * per_step * (B * (bg - bg.mean(1, keepdims=True))).reshape(G * B, T) / pairs
  np.testing.assert_allclose(np.asarray(g_cv - g0), want, rtol=1e-4, atol=1e-6)


def test_baseline_shape_error():
  lp = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"step_baselines shape \(4, 2\)"):
    prdp.rdp_loss(lp, lp, lp, jnp.zeros(4), group_size=2, beta=1.0, clip_eps=None,
                 step_baselines=jnp.zeros((4, 2)))


def test_step_advantages_hand_values():
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  scale = np.array([2.0, 2.0, 4.0, 4.0], np.float32)
  values = np.array([[1, 0], [3, 0], [0, 2], [0, 6]], np.float32)
  got = step_baselines.step_advantages(adv, scale, values, group_size=2)
  # group 1: b - mean = [[-1, 0], [1, 0]] / 2; group 2: [[0, -2], [0, 2]] / 4
  want = np.array([[1.5, 1.0], [-1.5, -1.0], [0.5, 1.0], [-0.5, -1.0]], np.float32)
  np.testing.assert_allclose(got, want)
  with pytest.raises(ValueError, match="not whole groups of 3"):
    step_baselines.group_centered(values, 3)


def test_tracker_and_batch_advantages_report_their_scale():
  r = np.array([0.0, 1.0, 3.0, 4.0], np.float32)
  adv, scale = ddpo.batch_advantages(r, with_scale=True)
  np.testing.assert_allclose(adv * scale, r - r.mean(), rtol=1e-6)
  t = ddpo.PerPromptStatTracker(2, buffer_size=4, min_count=2)
  adv, scale = t.update(np.array([0, 0, 1, 1]), r, with_scale=True)
  np.testing.assert_allclose(scale, [0.5 + 1e-6] * 4, rtol=1e-6)
  np.testing.assert_allclose(adv, [-1, 1, -1, 1], rtol=1e-5)


def test_value_correlation():
  r = np.array([0.0, 1.0, 2.0, 3.0])
  v = np.stack([r, -r, np.ones(4)], 1)
  np.testing.assert_allclose(step_baselines.value_correlation(r, v), [1, -1, 0], atol=1e-12)
  with pytest.raises(ValueError, match="step_baseline='value'"):
    step_baselines.check_kind("value")


def _chain_gradients(use_baseline: bool, groups: int, seed: int):
  """PRDP's gradient at theta = ref (= 0) on a 2-step Gaussian chain, one per group.

  x0 ~ N(0, 1) (shared by the group), x1 = x0 + theta_1 + e1, x2 = x1 + theta_2 + e2,
  e ~ N(0, 1); reward r = x2. The value of step 2's input is E[r | x1] = x1 (at theta = 0)
  and of step 1's input E[r | x0] = x0: both functions of the step's input only.
  """
  B = 4
  rng = np.random.default_rng(seed)
  x0 = np.repeat(rng.normal(size=(groups, 1)), B, axis=1).reshape(-1)
  e1, e2 = rng.normal(size=(2, groups * B))
  x1 = x0 + e1
  x2 = x1 + e2
  r = jnp.asarray(x2, jnp.float32)
  values = jnp.asarray(np.stack([x0, x1], 1), jnp.float32) if use_baseline else None

  def group_loss(theta, x0_, x1_, x2_, r_, v_):
    lp = jnp.stack([-0.5 * (x1_ - x0_ - theta[0]) ** 2, -0.5 * (x2_ - x1_ - theta[1]) ** 2], 1)
    ref = jax.lax.stop_gradient(lp)
    return prdp.rdp_loss(lp, ref, ref, r_, group_size=B, beta=1.0, clip_eps=None, reduce="sum",
                        step_baselines=v_)[0]

  split = lambda a: jnp.asarray(a, jnp.float32).reshape(groups, B, *np.shape(a)[1:])
  grad = jax.vmap(jax.grad(group_loss), in_axes=(None, 0, 0, 0, 0, None if values is None else 0))
  return np.asarray(grad(jnp.zeros(2, jnp.float32), split(x0), split(x1), split(x2), split(r),
                         None if values is None else split(values)))  # [groups, 2]


def test_state_baseline_keeps_the_expected_gradient_and_cuts_its_variance():
  plain = _chain_gradients(False, 4000, seed=3)
  cv = _chain_gradients(True, 4000, seed=3)
  # d loss / d theta_t = -2 mean_pairs (r_a - r_b)(e_a,t - e_b,t); x0 is shared within a
  # group, so r_a - r_b = de_1 + de_2 and the mean is -2 E[de_t^2] = -4 for both steps.
  # The baseline adds 2 mean_pairs db_t de_t, whose mean is 0 (db_2 = de_1).
  for est in (plain, cv):
    se = est.std(0) / np.sqrt(len(est))
    np.testing.assert_array_less(np.abs(est.mean(0) + 4.0), 4 * se)
  # Step 2 no longer sees step 1's noise: -2 de_2^2 instead of -2 (de_1 + de_2) de_2.
  assert cv[:, 1].var() < 0.75 * plain[:, 1].var(), (cv[:, 1].var(), plain[:, 1].var())
  # Step 1's baseline x0 is the group's shared start: nothing to remove there (the noise
  # of later steps stays in every earlier step's reward).
  np.testing.assert_allclose(cv[:, 0], plain[:, 0], rtol=1e-5, atol=1e-5)
