"""DDIM sampler with log-probs: timesteps, one step vs numpy, variances, CFG, and the
ratio-exactly-1 contract between the sampler and the trainer's recompute."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.diffusion.ddim import ddim_sigma, ddim_step, ddim_timesteps
from rft.diffusion.sampling import Trajectory
from tests.helpers import ddim_sample, trajectory_log_probs, transition_log_prob
from rft.diffusion.guidance import guided_eps
from rft.diffusion.schedules import make_schedule

SCHEDULES = {
    "linear": dict(name="linear"),
    "scaled_linear": dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(name="cosine"),
}


# --------------------------------------------------------------------------- timesteps


def test_timesteps_match_diffusers_leading_50():
  t, prev = ddim_timesteps(1000, 50)  # steps_offset=1, as in SD's scheduler config
  assert t.dtype == np.int32 and prev.dtype == np.int32 and t.shape == (50,)
  np.testing.assert_array_equal(t, np.arange(981, 0, -20))
  np.testing.assert_array_equal(t[:4], [981, 961, 941, 921])
  assert t[-1] == 1
  np.testing.assert_array_equal(prev, t - 20)
  assert prev[-1] == -19 and prev[-2] == 1


def test_timesteps_10_steps_and_offset_0():
  t, prev = ddim_timesteps(1000, 10)
  np.testing.assert_array_equal(t, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
  np.testing.assert_array_equal(prev, [801, 701, 601, 501, 401, 301, 201, 101, 1, -99])
  t0, prev0 = ddim_timesteps(1000, 10, steps_offset=0)
  np.testing.assert_array_equal(t0, np.arange(900, -1, -100))
  assert prev0[-1] == -100
  # 1000 // 7 = 142: leading spacing leaves the top of the range unused.
  t7, _ = ddim_timesteps(1000, 7)
  np.testing.assert_array_equal(t7, [853, 711, 569, 427, 285, 143, 1])


def test_timesteps_errors():
  with pytest.raises(ValueError, match="num_steps"):
    ddim_timesteps(1000, 0)
  with pytest.raises(ValueError, match="num_steps"):
    ddim_timesteps(100, 101)
  with pytest.raises(ValueError, match="outside"):
    ddim_timesteps(1000, 1000, steps_offset=1)  # would need t = 1000


def test_negative_prev_t_uses_alphas_cumprod_0():
  s = make_schedule("linear")
  ab = np.asarray(s.alphas_cumprod, np.float64)
  for prev_t in (-19, -99):
    got = float(ddim_sigma(s, 1, prev_t, 1.0))
    var = (1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0])
    np.testing.assert_allclose(got, np.sqrt(var), rtol=1e-4)
  # alpha_bar_prev = 1 (set_alpha_to_one=True) would give the final step another sigma.
  ab1 = 1.0
  sigma_one = np.sqrt((1 - ab1) / (1 - ab[1]) * (1 - ab[1] / ab1))
  assert abs(float(ddim_sigma(s, 1, -19, 1.0)) - sigma_one) > 1e-3


@pytest.mark.parametrize("num_steps", [10, 50])
def test_every_transition_has_positive_variance(num_steps):
  @jax.jit
  def sigmas_and_log_probs(sched, t, prev):
    sigma = ddim_sigma(sched, t, prev, 1.0)
    x = jnp.zeros((num_steps, 2, 2, 1))
    _, lp, lps = ddim_step(sched, jnp.full_like(x, 0.3), t, prev, x, 1.0,
                           prev_sample=jnp.full_like(x, 0.01))
    return sigma, lp, lps

  for name, kw in SCHEDULES.items():
    s = make_schedule(**kw)
    t, prev = ddim_timesteps(s.num_train_timesteps, num_steps)
    assert prev[-1] < 0
    sigma, lp, lps = map(np.asarray, sigmas_and_log_probs(s, t, prev))
    assert sigma.shape == (num_steps,)
    assert np.all(np.isfinite(sigma)) and np.all(sigma > 0), (name, sigma)
    # The log-prob of a transition at each step is finite (final step included).
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(lps)), (name, lp)


# --------------------------------------------------------------------------- one step


def _np_step(ab, t, prev_t, x, eps, eta, clip=None):
  """Numpy float64 re-implementation of DDIM Eq. 12 / 16; returns (mean, sigma)."""
  ab_t = ab[t].reshape(-1, 1, 1, 1)
  ab_p = np.where(prev_t >= 0, ab[np.maximum(prev_t, 0)], ab[0]).reshape(-1, 1, 1, 1)
  sigma = eta * np.sqrt((1 - ab_p) / (1 - ab_t)) * np.sqrt(1 - ab_t / ab_p)
  x0 = (x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
  if clip is not None:
    x0 = np.clip(x0, -clip, clip)
  mean = np.sqrt(ab_p) * x0 + np.sqrt(1 - ab_p - sigma ** 2) * eps
  return mean, sigma


def _np_gauss_logpdf(x, mean, sigma):
  return -0.5 * ((x - mean) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


@pytest.fixture(scope="module")
def step_data():
  rng = np.random.RandomState(0)
  x = rng.randn(4, 3, 3, 2).astype(np.float32)
  eps = (0.5 * rng.randn(4, 3, 3, 2) + 0.1).astype(np.float32)
  t = np.array([981, 501, 21, 1], np.int32)
  prev = t - 20
  return x, eps, t, prev


def test_ddim_step_scores_given_sample_like_numpy(step_data):
  x, eps, t, prev = step_data
  s = make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  mean, sigma = _np_step(ab, t, prev, x.astype(np.float64), eps.astype(np.float64), 0.7)
  x_prev = (mean + sigma * np.random.RandomState(1).randn(*x.shape)).astype(np.float32)
  out, lp, lps = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x),
                           0.7, prev_sample=jnp.asarray(x_prev))
  np.testing.assert_array_equal(np.asarray(out), x_prev)  # scoring returns the given sample
  ref = _np_gauss_logpdf(x_prev.astype(np.float64), mean, sigma).reshape(4, -1)
  assert lp.dtype == jnp.float32 and lp.shape == (4,) and lps.shape == (4,)
  np.testing.assert_allclose(np.asarray(lp), ref.mean(1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(lps), ref.sum(1), rtol=1e-4, atol=1e-3)


def test_ddim_step_sample_is_mean_plus_sigma_noise(step_data):
  x, eps, t, prev = step_data
  s = make_schedule("linear")
  ab = np.asarray(s.alphas_cumprod, np.float64)
  key = jax.random.PRNGKey(7)
  out, lp, _ = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x),
                         1.0, key=key)
  mean, sigma = _np_step(ab, t, prev, x.astype(np.float64), eps.astype(np.float64), 1.0)
  noise = np.asarray(jax.random.normal(key, x.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(np.asarray(out), mean + sigma * noise, rtol=1e-5, atol=1e-5)
  # Its log-prob is the standard-normal density of that noise, minus log sigma.
  ref = (-0.5 * noise ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).reshape(4, -1).mean(1)
  np.testing.assert_allclose(np.asarray(lp), ref, rtol=1e-3, atol=1e-3)


def test_ddim_step_eta0_is_deterministic_ddim(step_data):
  x, eps, t, prev = step_data
  s = make_schedule("cosine")
  ab = np.asarray(s.alphas_cumprod, np.float64)
  a, _, _ = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x), 0.0,
                      key=jax.random.PRNGKey(0))
  b, _, _ = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x), 0.0,
                      key=jax.random.PRNGKey(1))
  c, _, _ = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x), 0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  # DDIM Eq. 12 with sigma = 0: sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev) eps.
  ab_t = ab[t].reshape(-1, 1, 1, 1)
  ab_p = np.where(prev >= 0, ab[np.maximum(prev, 0)], ab[0]).reshape(-1, 1, 1, 1)
  x0 = (x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
  want = np.sqrt(ab_p) * x0 + np.sqrt(1 - ab_p) * eps
  np.testing.assert_allclose(np.asarray(a), want, rtol=1e-4, atol=1e-4)
  # A traced eta = 0 gives the same deterministic sample.
  d, _, _ = jax.jit(lambda eta, k: ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev),
                                             jnp.asarray(x), eta, key=k))(0.0, jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(d), want, rtol=1e-4, atol=1e-4)


def test_ddim_step_clip_and_scalar_t(step_data):
  x, eps, t, prev = step_data
  s = make_schedule("linear")
  ab = np.asarray(s.alphas_cumprod, np.float64)
  x_prev = jnp.asarray(x * 0.9)
  _, lp_clip, _ = ddim_step(s, jnp.asarray(eps), jnp.asarray(t), jnp.asarray(prev), jnp.asarray(x),
                            1.0, prev_sample=x_prev, clip_x0=1.0)
  mean, sigma = _np_step(ab, t, prev, x.astype(np.float64), eps.astype(np.float64), 1.0, clip=1.0)
  ref = _np_gauss_logpdf(np.asarray(x_prev, np.float64), mean, sigma).reshape(4, -1).mean(1)
  np.testing.assert_allclose(np.asarray(lp_clip), ref, rtol=1e-4, atol=1e-3)
  # A Python-int t equals the same t given per example.
  _, lp_a, _ = ddim_step(s, jnp.asarray(eps), 501, 481, jnp.asarray(x), 1.0, prev_sample=x_prev)
  _, lp_b, _ = ddim_step(s, jnp.asarray(eps), jnp.full((4,), 501), jnp.full((4,), 481),
                         jnp.asarray(x), 1.0, prev_sample=x_prev)
  np.testing.assert_array_equal(np.asarray(lp_a), np.asarray(lp_b))
  with pytest.raises(ValueError, match="key"):
    ddim_step(s, jnp.asarray(eps), 501, 481, jnp.asarray(x), 1.0)


# --------------------------------------------------------------------------- CFG


def test_guided_eps_matches_separate_calls():
  calls = []

  def eps_fn(p, x, t, c):
    calls.append(x.shape[0])
    return jnp.tanh(x * p + c["v"][:, None, None, :] + 0.01 * t[:, None, None, None])

  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 2, 2, 4), jnp.float32)
  cond = {"v": jnp.asarray(rng.randn(3, 4), jnp.float32)}
  null = {"v": jnp.zeros((1, 4))}
  t = jnp.array([5, 6, 7])
  eps_u = eps_fn(0.5, x, t, {"v": jnp.zeros((3, 4))})
  eps_c = eps_fn(0.5, x, t, cond)
  calls.clear()
  got = guided_eps(eps_fn, 0.5, x, t, cond, null, 3.0)
  assert calls == [6]  # one call on the concatenated [null; cond] batch
  np.testing.assert_allclose(np.asarray(got), np.asarray(eps_u + 3.0 * (eps_c - eps_u)),
                             rtol=1e-6, atol=1e-6)
  calls.clear()
  one = guided_eps(eps_fn, 0.5, x, t, cond, None, 1.0)
  assert calls == [3]  # scale 1: conditional half only
  np.testing.assert_array_equal(np.asarray(one), np.asarray(eps_c))
  # Scalar t is broadcast to [B]; traced scales run both halves and agree.
  traced = jax.jit(lambda s: guided_eps(eps_fn, 0.5, x, 6, cond, null, s))(3.0)
  eps_u6 = eps_fn(0.5, x, jnp.full((3,), 6), {"v": jnp.zeros((3, 4))})
  eps_c6 = eps_fn(0.5, x, jnp.full((3,), 6), cond)
  np.testing.assert_allclose(np.asarray(traced), np.asarray(eps_u6 + 3.0 * (eps_c6 - eps_u6)),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="null_cond"):
    guided_eps(eps_fn, 0.5, x, t, cond, None, 2.0)


# --------------------------------------------------------------------------- sampler


class TinyDenoiser(nn.Module):
  """Conv denoiser on [B, 8, 8, 3] with a timestep + cond-vector FiLM bias."""

  @nn.compact
  def __call__(self, x, t, cond):
    freqs = jnp.arange(1, 5, dtype=jnp.float32) / 300.0
    temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    h = nn.Dense(8)(jnp.concatenate([temb, cond], -1))
    y = nn.Conv(8, (3, 3))(x)
    y = nn.silu(nn.LayerNorm()(y) + h[:, None, None, :])
    return jnp.tanh(nn.Conv(3, (3, 3))(y))


B, S = 3, 6
CFG = 3.0


def _random_params(shapes, seed, scale=0.3):
  """Fills a param-shape tree with numpy normals (cheaper than compiling flax's init)."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda sd: jnp.asarray(scale * rng.randn(*sd.shape), sd.dtype), shapes)


@pytest.fixture(scope="module")
def setup():
  model = TinyDenoiser()
  rng = np.random.RandomState(0)
  x_T = jnp.asarray(rng.randn(B, 8, 8, 3), jnp.float32)
  cond = jnp.asarray(rng.randn(B, 5), jnp.float32)
  null = jnp.zeros((1, 5))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_T, jnp.zeros((B,), jnp.int32), cond)
  params = _random_params(shapes, seed=1)
  eps_fn = model.apply
  sched = make_schedule(**SCHEDULES["scaled_linear"])
  sample = jax.jit(functools.partial(ddim_sample, eps_fn, schedule=sched, num_steps=S, eta=1.0,
                                     guidance_scale=CFG))
  traj = sample(params, x_T, cond, null, key=jax.random.PRNGKey(3))
  return dict(eps_fn=eps_fn, params=params, x_T=x_T, cond=cond, null=null, sched=sched,
              traj=traj)


def test_trajectory_shapes(setup):
  traj = setup["traj"]
  assert isinstance(traj, Trajectory)
  assert traj.latents.shape == (B, S + 1, 8, 8, 3)
  assert traj.log_probs.shape == (B, S) and traj.log_probs.dtype == jnp.float32
  assert traj.log_probs_sum.shape == (B, S) and traj.log_probs_sum.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(traj.timesteps), ddim_timesteps(1000, S)[0])
  np.testing.assert_array_equal(np.asarray(traj.prev_timesteps), ddim_timesteps(1000, S)[1])
  assert traj.timesteps.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(traj.latents[:, 0]), np.asarray(setup["x_T"]))
  np.testing.assert_array_equal(np.asarray(traj.sample), np.asarray(traj.latents[:, -1]))
  assert np.all(np.isfinite(np.asarray(traj.log_probs)))
  # Sum over the 192 latent dims == mean * 192.
  np.testing.assert_allclose(np.asarray(traj.log_probs_sum), np.asarray(traj.log_probs) * 192,
                             rtol=1e-5)


def test_sampler_equals_loop_of_steps(setup):
  """The scan is a loop of ddim_step over ddim_timesteps with split keys and CFG."""
  s = setup
  keys = jax.random.split(jax.random.PRNGKey(3), S)
  t, prev = ddim_timesteps(1000, S)

  @jax.jit
  def step(x, t, prev_t, key):
    eps = guided_eps(s["eps_fn"], s["params"], x, t, s["cond"], s["null"], CFG)
    return ddim_step(s["sched"], eps, t, prev_t, x, 1.0, key=key)

  x = s["x_T"]
  for i in range(S):
    x, lp, _ = step(x, t[i], prev[i], keys[i])
    np.testing.assert_allclose(np.asarray(x), np.asarray(s["traj"].latents[:, i + 1]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(s["traj"].log_probs[:, i]),
                               rtol=1e-3, atol=1e-3)


def test_recompute_ratio_is_exactly_one(setup):
  s = setup
  traj, params = s["traj"], s["params"]
  kw = dict(schedule=s["sched"], eta=1.0, guidance_scale=CFG)

  # Whole trajectory at once (scan over the step axis).
  recompute = jax.jit(functools.partial(trajectory_log_probs, s["eps_fn"], **kw),
                      static_argnames="reduce")
  np.testing.assert_array_equal(np.asarray(recompute(params, traj, s["cond"], s["null"])),
                                np.asarray(traj.log_probs))
  np.testing.assert_array_equal(
      np.asarray(recompute(params, traj, s["cond"], s["null"], reduce="sum")),
      np.asarray(traj.log_probs_sum))

  # The trainer's side: a jitted value_and_grad of a DDPO-style ratio over a minibatch
  # whose examples sit at different steps (per-example t / prev_t).
  def ratio_loss(p, old, x_t, x_prev, t, prev_t, cond, null):
    new, _ = transition_log_prob(s["eps_fn"], p, x_t, x_prev, t, prev_t, cond, null, **kw)
    ratio = jnp.exp(new - old)
    return jnp.mean(ratio), (ratio, new)

  grad_fn = jax.jit(jax.value_and_grad(ratio_loss, has_aux=True))
  rows = jnp.arange(B)
  for shift in range(S):
    step = (jnp.arange(B) + shift) % S  # a different step per example
    batch = (traj.log_probs[rows, step], traj.latents[rows, step], traj.latents[rows, step + 1],
             traj.timesteps[step], traj.prev_timesteps[step], s["cond"], s["null"])
    (_, (ratio, new)), grads = grad_fn(params, *batch)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(batch[0]))
    np.testing.assert_array_equal(np.asarray(ratio), np.ones(B, np.float32))
    gnorm = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads))
    assert np.isfinite(gnorm) and gnorm > 0

  # Scalar (Python int) timesteps, no grad.
  one_step = jax.jit(functools.partial(transition_log_prob, s["eps_fn"], **kw))
  for i in range(S):
    lp, lps = one_step(params, traj.latents[:, i], traj.latents[:, i + 1], traj.timesteps[i],
                       traj.prev_timesteps[i], s["cond"], s["null"])
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(traj.log_probs[:, i]))
    np.testing.assert_array_equal(np.asarray(lps), np.asarray(traj.log_probs_sum[:, i]))

  # Changed params change the log-probs (the ratio can move away from 1).
  bumped = jax.tree_util.tree_map(lambda p, d: p + 0.05 * d, params,
                                  _random_params(params, seed=4, scale=1.0))
  new = recompute(bumped, traj, s["cond"], s["null"])
  assert np.abs(np.exp(np.asarray(new) - np.asarray(traj.log_probs)) - 1).max() > 1e-3


def test_sampler_traced_eta_and_scale_and_eta0(setup):
  s = setup
  f = jax.jit(lambda p, eta, g, k: ddim_sample(s["eps_fn"], p, s["x_T"], s["cond"], s["null"],
                                               schedule=s["sched"], num_steps=S, eta=eta,
                                               guidance_scale=g, key=k))
  traj = f(s["params"], 1.0, CFG, jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(traj.latents), np.asarray(s["traj"].latents),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(traj.log_probs), np.asarray(s["traj"].log_probs),
                             rtol=1e-4, atol=1e-4)
  # eta = 0 (traced): deterministic, independent of the key.
  a = f(s["params"], 0.0, CFG, jax.random.PRNGKey(5)).sample
  b = f(s["params"], 0.0, CFG, jax.random.PRNGKey(6)).sample
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Static eta = 0 needs no key at all and matches.
  c = ddim_sample(s["eps_fn"], s["params"], s["x_T"], s["cond"], s["null"], schedule=s["sched"],
                  num_steps=S, eta=0.0, guidance_scale=CFG).sample
  np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="key"):
    ddim_sample(s["eps_fn"], s["params"], s["x_T"], s["cond"], s["null"], schedule=s["sched"],
                num_steps=S, eta=1.0)


def test_rollout_scores_the_reference_in_the_same_loop(setup):
  """rollout(ref_params=...) records each transition's log-prob under the reference
  (as trajectory_log_probs would), leaves the policy's own chain and log-probs bitwise
  unchanged, gives 0 on a mixed rollout's ODE steps, and computes the layers the two
  models share once per step (one convolution fewer in the compiled loop)."""
  from rft.diffusion import sampling
  s = setup
  sampler = sampling.build("ddim", s["sched"], eta=1.0)
  # The reference differs from the policy only in the last conv: the first conv and
  # the conditioning Dense are the same leaves (a finetuned subset of layers).
  params = s["params"]
  conv1 = jax.tree_util.tree_map(lambda p: p + 0.1, params["params"]["Conv_1"])
  ref = {"params": dict(params["params"], Conv_1=conv1)}
  kw = dict(num_steps=S, guidance_scale=CFG, key=jax.random.PRNGKey(3))

  def roll_(policy, reference, sde=None, with_ref=True):
    return sampling.rollout(s["eps_fn"], policy, sampler, s["x_T"], s["cond"], s["null"],
                            sde_steps=sde, ref_params=reference if with_ref else None, **kw)

  roll = jax.jit(roll_, static_argnames="with_ref")

  def shared_roll(policy, last_conv, with_ref=True):
    # As the training loop builds them: the reference's other leaves ARE the policy's.
    return roll_(policy, {"params": dict(policy["params"], Conv_1=last_conv)},
                 with_ref=with_ref)

  plain, both = roll(params, ref, with_ref=False), roll(params, ref)
  assert plain.ref_log_probs is None and both.ref_log_probs.shape == (B, S)
  np.testing.assert_array_equal(np.asarray(both.latents), np.asarray(plain.latents))
  np.testing.assert_array_equal(np.asarray(both.log_probs), np.asarray(plain.log_probs))
  separate = jax.jit(lambda p, traj: sampling.trajectory_log_probs(
      s["eps_fn"], p, sampler, traj, s["cond"], s["null"], guidance_scale=CFG))(ref, plain)
  np.testing.assert_allclose(np.asarray(both.ref_log_probs), np.asarray(separate),
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(both.ref_log_probs) - np.asarray(both.log_probs)).max() > 1e-3
  # With the policy as its own reference the two are the same numbers.
  same = roll(params, params)
  np.testing.assert_array_equal(np.asarray(same.ref_log_probs), np.asarray(same.log_probs))

  sde = jnp.asarray([True, False, True, True, False, False])
  mixed = roll(params, ref, sde)
  assert np.all(np.asarray(mixed.ref_log_probs)[:, ~np.asarray(sde)] == 0.0)
  assert np.all(np.asarray(mixed.ref_log_probs)[:, np.asarray(sde)] != 0.0)

  def convs(with_ref):
    return jax.jit(shared_roll, static_argnames="with_ref").lower(
        params, conv1, with_ref=with_ref).compile().as_text().count("convolution(")
  # Per step: policy 2 convs; the reference adds only its own last conv (CFG doubles
  # the batch, not the calls).
  assert convs(True) == convs(False) + convs(False) // 2
