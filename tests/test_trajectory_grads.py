"""Gradients through stored trajectories (PRDP/DDPO) and through the sampler (DRaFT/AlignProp).

The step-by-step accumulation of rft.objectives.trajectory must give the same loss and
gradient as one value_and_grad through all steps; reward backprop must match finite
differences and the truncation must cut exactly the early steps.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.diffusion import sampling
from rft.diffusion.ddim import ddim_timesteps
from rft.diffusion.schedules import make_schedule
from rft.objectives import ddpo, draft, prdp, trajectory
from tests.helpers import ddim_sample, ddim_sampler
from tests.test_ddim import TinyDenoiser, _random_params

B, S, G = 4, 5, 2  # samples per prompt, steps, prompts
N = B * G
ETA, CFG = 1.0, 2.0


@pytest.fixture(scope="module")
def setup():
  model = TinyDenoiser()
  rng = np.random.RandomState(0)
  x_T = jnp.asarray(rng.randn(N, 8, 8, 3), jnp.float32)
  cond = jnp.asarray(rng.randn(N, 5), jnp.float32)
  null = jnp.zeros((1, 5))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_T, jnp.zeros((N,), jnp.int32),
                          cond)
  params = _random_params(shapes, seed=1)
  ref = _random_params(shapes, seed=2)
  ref = jax.tree.map(lambda p, q: p + 0.05 * q, params, ref)
  sched = make_schedule("scaled_linear", 1000)
  traj = jax.jit(functools.partial(ddim_sample, model.apply, schedule=sched, num_steps=S,
                                   eta=ETA, guidance_scale=CFG, clip_x0=1.0))(
                                       params, x_T, cond, null, key=jax.random.PRNGKey(3))
  scorer = trajectory.StepScorer(model.apply, ddim_sampler(sched, ETA, 1.0), CFG)
  batch = {"latents": traj.latents, "timesteps": traj.timesteps,
           "prev_timesteps": traj.prev_timesteps, "log_probs": traj.log_probs,
           "cond": cond, "null_cond": null,
           "rewards": jnp.asarray(rng.rand(N), jnp.float32),
           "advantages": jnp.asarray(rng.randn(N), jnp.float32)}
  batch["ref_log_probs"] = scorer.all_steps(ref, batch)
  # Params a little away from theta_old, so ratios differ from 1 and clipping engages.
  moved = jax.tree.map(lambda p, q: p + 0.02 * q, params, _random_params(shapes, seed=3))
  return dict(model=model, params=params, moved=moved, batch=batch, scorer=scorer,
              sched=sched, x_T=x_T, cond=cond, null=null)


def _prdp_loss(lp, b):
  return prdp.rdp_loss(lp, b["log_probs"], b["ref_log_probs"], b["rewards"], group_size=B,
                      beta=0.1, clip_eps=0.05, reduce="mean")


def _max_rel_err(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)) for x, y in zip(la, lb))


def test_stored_log_probs_are_the_recomputed_ones_bitwise(setup):
  lp = jax.jit(setup["scorer"].all_steps)(setup["params"], setup["batch"])
  np.testing.assert_array_equal(np.asarray(lp), np.asarray(setup["batch"]["log_probs"]))


def test_prdp_stepwise_gradient_equals_full_backprop(setup):
  s, b = setup["scorer"], setup["batch"]
  ident = lambda p: p
  loss, m, g = jax.jit(lambda p: trajectory.coupled_grads(s, ident, p, b, _prdp_loss,
                                                           jax.random.key(0)))(setup["moved"])
  loss_n, _, g_n = jax.jit(lambda p: trajectory.naive_coupled_grads(s, ident, p, b, _prdp_loss))(
      setup["moved"])
  assert float(m["clip_frac"]) > 0  # the proximal clip is active in this comparison
  np.testing.assert_allclose(float(loss), float(loss_n), rtol=1e-5)
  assert _max_rel_err(g, g_n) < 1e-4
  assert float(optax_norm(g)) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_prdp_on_policy_shortcut_equals_recompute(setup):
  """At theta == theta_old the stored log-probs replace the forward scan exactly."""
  s, b = setup["scorer"], setup["batch"]
  ident = lambda p: p
  f = jax.jit(lambda p, lp: trajectory.coupled_grads(s, ident, p, b, _prdp_loss,
                                                     jax.random.key(0), log_probs=lp))
  loss_a, _, g_a = f(setup["params"], b["log_probs"])
  loss_b, _, g_b = jax.jit(lambda p: trajectory.coupled_grads(
      s, ident, p, b, _prdp_loss, jax.random.key(0)))(setup["params"])
  assert float(loss_a) == float(loss_b)
  for x, y in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ddpo_stepwise_gradient_equals_full_backprop(setup):
  s, b = setup["scorer"], setup["batch"]
  ident = lambda p: p
  kw = dict(clip_range=1e-3, adv_clip_max=5.0, importance_sampling=True)

  def step_loss(lp_j, j, bb):
    return ddpo.ddpo_step_loss(lp_j, jnp.take(bb["log_probs"], j, axis=1), bb["advantages"], **kw)

  def full_loss(lp, bb):  # mean over steps of the per-step losses
    losses = [ddpo.ddpo_step_loss(lp[:, j], bb["log_probs"][:, j], bb["advantages"], **kw)[0]
              for j in range(S)]
    return jnp.mean(jnp.stack(losses)), {}

  loss, _, g = jax.jit(lambda p: trajectory.separable_grads(s, ident, p, b, step_loss,
                                                             jax.random.key(0)))(setup["moved"])
  loss_n, _, g_n = jax.jit(lambda p: trajectory.naive_coupled_grads(s, ident, p, b, full_loss))(
      setup["moved"])
  np.testing.assert_allclose(float(loss), float(loss_n), rtol=1e-5)
  assert _max_rel_err(g, g_n) < 1e-4


def test_ddpo_ratio_is_one_on_policy(setup):
  s, b = setup["scorer"], setup["batch"]

  def step_loss(lp_j, j, bb):
    return ddpo.ddpo_step_loss(lp_j, jnp.take(bb["log_probs"], j, axis=1), bb["advantages"],
                               clip_range=1e-4, adv_clip_max=5.0)

  _, m, _ = jax.jit(lambda p: trajectory.separable_grads(s, lambda q: q, p, b, step_loss,
                                                         jax.random.key(0)))(setup["params"])
  assert float(m["ratio"]) == 1.0 and float(m["clip_frac"]) == 0.0 and float(m["approx_kl"]) == 0.0


def test_timestep_subset_is_scaled_to_be_unbiased():
  steps, scale = trajectory.select_steps(jax.random.key(0), 10, 0.3)
  assert steps.shape == (3,) and scale == pytest.approx(10 / 3)
  assert len(set(np.asarray(steps).tolist())) == 3
  steps, scale = trajectory.select_steps(jax.random.key(0), 10, 1.0)
  np.testing.assert_array_equal(np.asarray(steps), np.arange(10)) and scale == 1.0
  # Averaging the subset estimate over many keys approaches the full-trajectory sum.
  g = jnp.arange(10.0)
  est = np.mean([float(jnp.sum(g[trajectory.select_steps(jax.random.key(k), 10, 0.3)[0]]))
                 * 10 / 3 for k in range(400)])
  assert abs(est - 45.0) < 2.0


# --------------------------------------------------------------------------- reward backprop


def _rollout_loss(setup, params, k, random_truncation=False):
  x0 = sampling.truncated_rollout(setup["model"].apply, params, ddim_sampler(setup["sched"], ETA),
                                  setup["x_T"], setup["cond"], setup["null"], jax.random.key(7),
                                  num_steps=S, guidance_scale=CFG, grad_steps=k,
                                  random_truncation=random_truncation)
  return jnp.mean(jnp.sin(3 * x0))  # a smooth stand-in for a differentiable reward


def test_full_reward_backprop_matches_finite_differences(setup):
  params = setup["params"]
  g = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, S)))(params)
  rng = np.random.RandomState(5)
  v = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
  nv = float(optax_norm(v))
  v = jax.tree.map(lambda d: d / nv, v)  # unit direction
  h = 1e-3
  f = jax.jit(lambda p: _rollout_loss(setup, p, S))
  plus = f(jax.tree.map(lambda p, d: p + h * d, params, v))
  minus = f(jax.tree.map(lambda p, d: p - h * d, params, v))
  fd = (float(plus) - float(minus)) / (2 * h)
  an = float(sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v))))
  assert abs(fd - an) <= 2e-2 * abs(an) + 1e-5, (fd, an)


def test_draft_k_truncation_cuts_exactly_the_early_steps(setup):
  """DRaFT-K's gradient == the gradient w.r.t. the params used in the last K steps only."""
  params, K = setup["params"], 2
  g = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, K)))(params)

  ts, prev = ddim_timesteps(1000, S)
  keys = jax.random.split(jax.random.key(7), S)

  def two_param_loss(late):
    x = setup["x_T"]
    for i in range(S):
      p = late if i >= S - K else params
      step = sampling._remat_step(setup["model"].apply, ddim_sampler(setup["sched"], ETA), CFG)
      x = step(p, x, int(ts[i]), int(prev[i]), setup["cond"], setup["null"], keys[i])
    return jnp.mean(jnp.sin(3 * x))

  g_ref = jax.jit(jax.grad(two_param_loss))(params)
  assert _max_rel_err(g, g_ref) < 1e-4
  # K = 0: no gradient at all; random truncation with K = S equals fixed K = S.
  g0 = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, 0)))(params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g0))
  g_full = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, S)))(params)
  g_rand = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, jnp.int32(S), True)))(params)
  assert _max_rel_err(g_rand, g_full) < 1e-5
  g_rand_k = jax.jit(jax.grad(lambda p: _rollout_loss(setup, p, jnp.int32(K), True)))(params)
  assert _max_rel_err(g_rand_k, g) < 1e-5


def test_lv_rollout_shapes_and_gradient(setup):
  f = lambda p: draft.lv_rollout(setup["model"].apply, p, ddim_sampler(setup["sched"], ETA, 1.0),
                                 setup["x_T"], setup["cond"], setup["null"], jax.random.key(1),
                                 num_steps=S, guidance_scale=CFG, num_renoise=3)
  x0, renoised = jax.jit(f)(setup["params"])
  assert x0.shape == (N, 8, 8, 3) and renoised.shape == (3, N, 8, 8, 3)
  # Re-denoised copies stay close to x0 (one step from the lowest noise level)...
  assert float(jnp.mean(jnp.abs(renoised - x0[None]))) < 0.5
  # ...and the reward gradient flows only through that last step.
  g = jax.jit(jax.grad(lambda p: jnp.mean(jnp.sin(3 * f(p)[1]))))(setup["params"])
  assert float(optax_norm(g)) > 0
  gx0 = jax.jit(jax.grad(lambda p: jnp.mean(jnp.sin(3 * f(p)[0]))))(setup["params"])
  assert float(optax_norm(gx0)) == 0.0


def test_ratio_is_one_on_policy_with_lora(setup):
  """LoRA: the sampler merges base + A B inside its program, the trainer inside its own;
  with the base passed as an argument both give the same log-probs bitwise."""
  from rft.models import lora
  model, base = setup["model"], setup["params"]
  tr = lora.init(base, jax.random.key(0), 2, r"kernel$")
  tr = jax.tree.map(lambda x: x + 0.1, tr)  # nonzero B: the merge changes the weights
  merge = lambda t, b: lora.merge(b, t, 4.0, 2)

  @jax.jit
  def sample(t, b, x_T, cond, null):
    return ddim_sample(model.apply, merge(t, b), x_T, cond, null, schedule=setup["sched"],
                       num_steps=S, eta=ETA, guidance_scale=CFG, clip_x0=1.0,
                       key=jax.random.PRNGKey(4))

  traj = sample(tr, base, setup["x_T"], setup["cond"], setup["null"])
  batch = dict(setup["batch"], latents=traj.latents, log_probs=traj.log_probs)

  def step_loss(lp_j, j, bb):
    return ddpo.ddpo_step_loss(lp_j, jnp.take(bb["log_probs"], j, axis=1), bb["advantages"],
                               clip_range=1e-4, adv_clip_max=5.0)

  @jax.jit
  def grads(t, b, bb):
    return trajectory.separable_grads(setup["scorer"], lambda q: merge(q, b), t, bb, step_loss,
                                      jax.random.key(0))

  _, m, g = grads(tr, base, batch)
  assert float(m["ratio"]) == 1.0 and float(m["clip_frac"]) == 0.0
  assert float(optax_norm(g)) > 0
