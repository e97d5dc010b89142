"""Rectified flow: schedule parity with diffusers, the Euler / Flow-GRPO SDE / CPS steps
against hand computations, exact on-policy log-prob recompute, the flow loss, the DiT."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.diffusion import flow, sampling
from rft.diffusion.flow import FlowSampler, FlowSchedule
from rft.diffusion.pipeline import SamplerConfig, flow_pipeline
from rft.diffusion.schedules import make_schedule
from rft.models.dit import DiT, TextToImageDiT, sincos_2d

SCHEDULES = [({}, 10, None), ({"shift": 3.0}, 28, None), ({"shift": 3.0}, 1, None),
             ({"shift": 3.0}, 40, None),
             ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 20, 0.8)]


@pytest.mark.parametrize("kw,n,mu", SCHEDULES)
def test_sigmas_and_timesteps_equal_diffusers(kw, n, mu):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kw)
  ref.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
  ours = FlowSchedule(**kw)
  np.testing.assert_array_equal(ours.sigmas(n, mu), ref.sigmas.numpy())
  t, t_prev = FlowSampler(ours, mu=mu).timesteps(n)
  np.testing.assert_array_equal(t, ref.timesteps.numpy())
  np.testing.assert_array_equal(t_prev[:-1], t[1:])


def test_dynamic_shift_needs_mu_and_mu_formula():
  s = FlowSchedule(use_dynamic_shifting=True)
  with pytest.raises(ValueError, match="mu"):
    s.sigmas(4)
  # SD3 / FLUX: mu is linear in the token count, base_shift at 256 and max_shift at 4096.
  assert s.mu_for(256) == pytest.approx(0.5)
  assert s.mu_for(4096) == pytest.approx(1.15)


def test_euler_step_equals_diffusers():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  ref.set_timesteps(6)
  sampler = FlowSampler(FlowSchedule(shift=3.0), eta=0)
  ts, prevs = sampler.timesteps(6)
  rng = np.random.RandomState(0)
  x = rng.randn(2, 4, 4, 3).astype(np.float32)
  for i, t in enumerate(ref.timesteps):
    v = rng.randn(2, 4, 4, 3).astype(np.float32)
    want = ref.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
    got, lp = sampler.step(jnp.asarray(v), ts[i], prevs[i], jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    assert np.isnan(np.asarray(lp[0])).all()  # the ODE has no density
    x = want


def _sde_by_hand(x, v, sigma, sigma_prev, a):
  """Flow-GRPO's SDE step (Liu et al. 2025, Eq. 8-9) in float64."""
  x, v = x.astype(np.float64), v.astype(np.float64)
  dt = sigma_prev - sigma
  std_t = a * math.sqrt(sigma / (1 - (sigma_prev if sigma == 1 else sigma)))
  mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
  return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("step", [0, 3, 8])
def test_sde_step_mean_std_log_prob_by_hand(step):
  sampler = FlowSampler(FlowSchedule(shift=3.0), eta=0.7)
  ts, prevs = sampler.timesteps(10)
  sigma, sigma_prev = float(ts[step]) / 1000, float(prevs[step]) / 1000
  rng = np.random.RandomState(step)
  x = rng.randn(3, 4, 4, 2).astype(np.float32)
  v = rng.randn(3, 4, 4, 2).astype(np.float32)
  mean, std = _sde_by_hand(x, v, sigma, sigma_prev, 0.7)
  key = jax.random.key(step)
  got, (lp_mean, lp_sum) = sampler.step(jnp.asarray(v), ts[step], prevs[step], jnp.asarray(x),
                                        key=key)
  z = np.asarray(jax.random.normal(key, x.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(np.asarray(got), mean + std * z, rtol=1e-5, atol=1e-5)
  # log N(x_prev; mean, std^2 I), per dimension: -z^2/2 - log std - log sqrt(2 pi).
  want = (-0.5 * z ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).reshape(3, -1)
  np.testing.assert_allclose(np.asarray(lp_mean), want.mean(1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(lp_sum), want.sum(1), rtol=1e-4, atol=1e-3)
  # Scoring a given transition: the density of that point under the same Gaussian.
  other = (mean + 0.5 * std).astype(np.float32)
  _, (lp2, _) = sampler.step(jnp.asarray(v), ts[step], prevs[step], jnp.asarray(x),
                             prev_sample=jnp.asarray(other))
  want2 = -0.125 - math.log(std) - 0.5 * math.log(2 * math.pi)
  np.testing.assert_allclose(np.asarray(lp2), want2, rtol=1e-4, atol=1e-3)


def test_cps_step_by_hand():
  sampler = FlowSampler(FlowSchedule(), eta=0.5, kind="cps")
  ts, prevs = sampler.timesteps(5)
  sigma, sp = float(ts[1]) / 1000, float(prevs[1]) / 1000
  rng = np.random.RandomState(1)
  x, v = rng.randn(2, 3).astype(np.float32), rng.randn(2, 3).astype(np.float32)
  s = sp * math.sin(0.5 * math.pi / 2)
  mean = (x - sigma * v) * (1 - sp) + (x + (1 - sigma) * v) * math.sqrt(sp ** 2 - s ** 2)
  got_mean, got_std = sampler.mean_std(jnp.asarray(v), ts[1], prevs[1], jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got_mean), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_std).ravel(), s, rtol=1e-6)


def test_forward_process_and_x0_prediction_invert_each_other():
  sampler = FlowSampler(FlowSchedule(shift=2.0), eta=0.7)
  rng = np.random.RandomState(0)
  x0, eps = rng.randn(4, 5).astype(np.float32), rng.randn(4, 5).astype(np.float32)
  t = jnp.asarray([1000.0, 700.0, 300.0, 10.0])
  x_t = sampler.add_noise(jnp.asarray(x0), jnp.asarray(eps), t)
  sigma = np.asarray(t)[:, None] / 1000
  np.testing.assert_allclose(np.asarray(x_t), (1 - sigma) * x0 + sigma * eps, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sampler.predicted_x0(jnp.asarray(eps - x0), t, x_t)), x0,
                             atol=2e-6)


def test_registry_builds_flow_and_rejects_mismatches():
  s = sampling.build("flow", FlowSchedule(), eta=0.7, prediction="velocity")
  assert isinstance(s, FlowSampler) and s.kind == "sde"
  assert sampling.build("flow_cps", FlowSchedule(), prediction="velocity").kind == "cps"
  with pytest.raises(ValueError, match="velocity"):
    sampling.build("flow", FlowSchedule(), prediction="eps")
  with pytest.raises(ValueError, match="FlowSchedule"):
    sampling.build("flow", make_schedule("cosine"), prediction="velocity")
  with pytest.raises(ValueError, match="kind"):
    FlowSampler(FlowSchedule(), kind="ode")


def _tiny_flow_model():
  model = TextToImageDiT(vocab_size=16, max_len=6, text_width=16, text_depth=1, text_heads=2,
                         width=32, depth=2, num_heads=2)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)),
                      jnp.ones((1, 6), jnp.int32))["params"]
  # adaLN-Zero starts at the zero map; perturb every weight so the test sees a real model.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [w + 0.05 * jax.random.normal(k, w.shape)
                                     for w, k in zip(leaves, keys)])
  return model, params


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_on_policy_log_probs_recompute(micro_batch):
  """Recomputed at the sampling batch size, the log-probs equal the sampled ones bit for
  bit; in smaller micro-batches XLA may pick other kernels for the model, so they agree to
  float32 rounding (the RL loops use the stored log-probs for the on-policy ratio, which is
  therefore exactly 1 whatever the micro-batch)."""
  model, params = _tiny_flow_model()
  pipe = flow_pipeline(model, FlowSchedule(shift=3.0), image_size=8)
  cfg = SamplerConfig(num_steps=6, eta=0.7, guidance_scale=2.0, clip_x0=None, name="flow")
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 16, (4, 6)), jnp.int32)
  traj, cond, null = jax.jit(lambda p, t, k: pipe.sample(p, t, k, cfg))(
      params, tokens, jax.random.key(3))
  assert np.isfinite(np.asarray(traj.log_probs)).all()
  sampler = pipe.sampler(cfg)
  recompute = jax.jit(lambda p, tr, c, n: sampling.trajectory_log_probs(
      pipe.model_fn, p, sampler, tr, c, n, guidance_scale=cfg.guidance_scale))
  parts = []
  for s in range(0, 4, micro_batch):
    sl = slice(s, s + micro_batch)
    part = jax.tree.map(lambda a: a[sl] if a.ndim and a.shape[0] == 4 else a, traj)
    parts.append(np.asarray(recompute(params, part, jax.tree.map(lambda a: a[sl], cond), null)))
  got = np.concatenate(parts)
  if micro_batch == 4:
    np.testing.assert_array_equal(got, np.asarray(traj.log_probs))
  else:
    np.testing.assert_allclose(got, np.asarray(traj.log_probs), rtol=1e-5, atol=1e-5)


def test_flow_loss_by_hand():
  schedule = FlowSchedule()
  rng = np.random.RandomState(0)
  x0 = jnp.asarray(rng.randn(3, 4, 4, 3).astype(np.float32))
  seen = {}

  def model_fn(params, x_t, t, cond):
    seen["t"] = t
    return params * x_t

  key = jax.random.key(5)
  loss, _ = flow.flow_loss(model_fn, jnp.float32(0.5), x0, {"c": jnp.zeros((3, 1))}, None, key,
                           schedule, cond_dropout=0, weighting="logit_normal")
  s_key, n_key, _ = jax.random.split(key, 3)
  sigma = np.asarray(jax.nn.sigmoid(jax.random.normal(s_key, (3,))))[:, None, None, None]
  eps = np.asarray(jax.random.normal(n_key, x0.shape))
  x_t = (1 - sigma) * np.asarray(x0) + sigma * eps
  want = np.mean((0.5 * x_t - (eps - np.asarray(x0))) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(seen["t"]), sigma.ravel() * 1000, rtol=1e-6)
  with pytest.raises(ValueError, match="weighting"):
    flow.sample_sigmas(key, 2, "cosine")


def test_sincos_2d_by_hand():
  pe = sincos_2d(3, 4, 8)
  assert pe.shape == (12, 8)
  # token (row 2, col 1): first half encodes the row, second the column; omega = 1, 1/100.
  row, col = 2, 1
  want = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
          math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
  np.testing.assert_allclose(pe[2 * 4 + 1], want, rtol=1e-6)


def test_dit_starts_at_zero_and_checks_shapes():
  dit = DiT(patch=2, width=32, depth=2, num_heads=2)
  x = jnp.ones((2, 8, 8, 3))
  ctx, mask = jnp.ones((2, 5, 16)), jnp.ones((2, 5), bool)
  params = dit.init(jax.random.key(0), x, jnp.zeros((2,)), ctx, mask)
  out = dit.apply(params, x, jnp.array([10.0, 900.0]), ctx, mask)
  assert out.shape == (2, 8, 8, 3) and not np.asarray(out).any()  # adaLN-Zero + zero proj
  with pytest.raises(ValueError, match="divisible"):
    dit.apply(params, jnp.ones((2, 7, 8, 3)), jnp.zeros((2,)), ctx, mask)


def test_dit_patches_map_back_to_their_pixels():
  """Depth 0, identity patch embedding and output projection: the output is each patch's
  own pixels (plus its position embedding, layer-normalised) back in place, so
  patchify and unpatchify invert each other."""
  dit = DiT(patch=2, width=12, depth=0, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  ctx, mask = jnp.ones((2, 3, 8)), jnp.ones((2, 3), bool)
  p = dit.init(jax.random.key(1), x, jnp.zeros((2,)), ctx, mask)["params"]
  p["patch_embed"] = {"kernel": jnp.eye(12), "bias": jnp.zeros(12)}
  p["final_proj"] = {"kernel": jnp.eye(12), "bias": jnp.zeros(12)}
  out = dit.apply({"params": p}, x, jnp.zeros((2,)), ctx, mask)
  tokens = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 12)
  h = tokens + sincos_2d(2, 3, 12)[None]
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  want = h.reshape(2, 2, 3, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


def test_dit_flow_training_reduces_the_loss():
  """A few Adam steps of flow matching on one fixed batch lower its loss."""
  import optax
  model, params = _tiny_flow_model()
  pipe = flow_pipeline(model, FlowSchedule(), image_size=8)
  x0 = jnp.tile(jnp.linspace(-1, 1, 8)[None, :, None, None], (4, 1, 8, 3))
  tokens = jnp.ones((4, 6), jnp.int32)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p):
    cond, null = pipe.conditions(p, tokens)
    return flow.flow_loss(pipe.model_fn, p, x0, cond, null, jax.random.key(0), pipe.schedule,
                          cond_dropout=0)[0]

  @jax.jit
  def step(p, o):
    l, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o)
    return optax.apply_updates(p, u), o, l

  first = None
  for _ in range(30):
    params, opt, l = step(params, opt)
    first = float(l) if first is None else first
  assert float(loss_fn(params)) < 0.5 * first


def test_flow_base_pretrains_loads_and_finetunes_through_the_seams(tmp_path):
  """configs/pretrain_flow_shapes.py:smoke exports a DiT bundle (family "dit", flow
  schedule) that loads back with the same params, and PRDP runs on it with the flow SDE
  sampler (the objective and loop are sampler-agnostic)."""
  import json

  from rft import pretrained
  from tests.helpers import run_main
  base = tmp_path / "base"
  run_main("configs/pretrain_flow_shapes.py:smoke", base)
  model, params, meta = pretrained.load_shapes_base(str(base))
  assert isinstance(model, TextToImageDiT) and meta["model"]["family"] == "dit"
  assert meta["schedule"] == {"name": "flow", "num_train_timesteps": 1000, "shift": 1.0}
  assert "dit" in params and "unet" not in params
  run = tmp_path / "prdp"
  # An untrained base draws noise, whose alignment reward is exactly 0 for every sample
  # (all pairs tied, no gradient); brightness differs between any two samples.
  run_main("configs/prdp.py:smoke", run, f"--config.base_dir={base}",
           "--config.sampler.name=flow", "--config.sampler.eta=0.7", "--config.reward=brightness")
  results = json.load(open(run / "results.json"))
  assert results["epochs"] == 2 and results["reward_queries"] > 0
  tuned, tuned_params, tuned_meta = pretrained.load_shapes_base(str(run))
  assert isinstance(tuned, TextToImageDiT)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned_params["dit"], params["dit"])
  assert max(jax.tree.leaves(moved)) > 0  # the DiT was trained
  np.testing.assert_array_equal(np.asarray(tuned_params["text"]["tok_embed"]["embedding"]),
                                np.asarray(params["text"]["tok_embed"]["embedding"]))
  # Flow-GRPO on the same base; without a base_dir its config stops at once, naming it.
  run_main("configs/flow_grpo.py:smoke", tmp_path / "fg", f"--config.base_dir={base}",
           "--config.reward=brightness")
  assert json.load(open(tmp_path / "fg" / "results.json"))["objective"] == "flow_grpo"
  p = run_main("configs/flow_grpo.py:smoke", tmp_path / "fg2", check=False)
  assert p.returncode != 0 and "config.base_dir" in p.stderr
  # A DDPM sampler on a flow model is a clear error naming what is wrong.
  p = run_main("configs/prdp.py:smoke", tmp_path / "bad", f"--config.base_dir={base}", check=False)
  assert p.returncode != 0 and "velocity" in p.stderr


def test_flow_grpo_group_advantages_by_hand():
  from rft.objectives.flow_grpo import group_advantages
  ids = np.array([3, 7, 3, 7, 3, 7])  # groups interleaved: grouping is by id, not order
  r = np.array([1.0, 0.0, 2.0, 0.0, 3.0, 4.0])
  adv, scale = group_advantages(ids, r)
  s3 = np.std([1.0, 2.0, 3.0]) + 1e-4
  s7 = np.std([0.0, 0.0, 4.0]) + 1e-4
  np.testing.assert_allclose(adv, [-1 / s3, (0 - 4 / 3) / s7, 0, (0 - 4 / 3) / s7, 1 / s3,
                                   (4 - 4 / 3) / s7], rtol=1e-6)
  np.testing.assert_allclose(scale, [s3, s7, s3, s7, s3, s7], rtol=1e-6)
  adv_g, scale_g = group_advantages(ids, r, global_std=True)
  np.testing.assert_allclose(scale_g, np.std(r) + 1e-4, rtol=1e-6)
  np.testing.assert_allclose(adv_g[0], (1 - 2) / (np.std(r) + 1e-4), rtol=1e-6)
  # A group whose samples all score the same gets zero advantages, not NaN.
  adv_t, _ = group_advantages(np.array([1, 1]), np.array([0.5, 0.5]))
  np.testing.assert_array_equal(adv_t, 0.0)


def test_flow_grpo_record_checks_and_on_policy_loss():
  from rft import config as config_lib
  from rft.objectives import registry
  obj = registry.diffusion("flow_grpo")
  assert obj.kind == "trajectory" and obj.needs_groups
  c = config_lib.load("flow_grpo", "smoke")
  obj.check(c)
  assert c.objective.kl_coef == 0.04 and config_lib.load("flow_grpo", "fast").objective.kl_coef == 0
  assert obj.make_loss(c).kl_coef == 0.04
  for key, value, match in (("objective.kl_coef", -0.1, "kl_coef"),
                            ("sampler.eta", 0.0, "stochastic"),
                            ("sampler.name", "ddim", "flow SDE")):
    bad = config_lib.load("flow_grpo", "smoke")
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match=match):
      obj.check(bad)
  # On-policy the ratio is 1 and the PPO surrogate is -mean(clip(A)).
  loss = obj.make_loss(c)
  lp = jnp.asarray(np.random.RandomState(0).randn(4, 3), jnp.float32)
  adv = jnp.asarray([1.0, -2.0, 7.0, 0.5])
  value, m = loss.fn(lp[:, 1], 1, {"advantages": adv, "log_probs": lp})
  np.testing.assert_allclose(float(value), -np.mean([1.0, -2.0, 5.0, 0.5]), rtol=1e-6)
  assert float(m["ratio"]) == 1.0


def _linear_flow_batch(n=3, steps=4, seed=0):
  """A toy velocity model v = w·x + b·t/1000 and a stored flow-SDE trajectory of it."""
  from rft.diffusion import flow, sampling
  sched = flow.FlowSchedule(num_train_timesteps=1000, shift=3.0)
  sampler = flow.FlowSampler(sched, eta=0.7)
  model_fn = lambda p, x, t, cond: p["w"] * x + p["b"] * (t / 1000.0)[:, None, None, None]
  params = {"w": jnp.float32(-0.9), "b": jnp.float32(0.3)}
  x_T = jax.random.normal(jax.random.key(seed), (n, 4, 4, 2))
  traj = sampling.rollout(model_fn, params, sampler, x_T, None, None, num_steps=steps,
                          guidance_scale=1.0, key=jax.random.key(seed + 1))
  batch = {"latents": traj.latents, "timesteps": traj.timesteps,
           "prev_timesteps": traj.prev_timesteps, "log_probs": traj.log_probs,
           "cond": None, "null_cond": None}
  return sampler, model_fn, params, batch


def test_flow_step_kl_by_hand_and_as_a_gaussian_kl():
  from rft.diffusion import flow
  sampler, model_fn, params, batch = _linear_flow_batch()
  x = batch["latents"][:, 1]
  t, tp = batch["timesteps"][1], batch["prev_timesteps"][1]
  v = model_fn(params, x, jnp.full((3,), t), None)
  v_ref = v + 0.05 * jax.random.normal(jax.random.key(3), v.shape)
  kl = np.asarray(sampler.step_kl(v, v_ref, t, tp, x))
  s, sp = float(t) / 1000, float(tp) / 1000
  a = 0.7 * np.sqrt(s / (1 - s))  # the reference code's std_dev_t
  dt = sp - s
  mean = lambda vv: (np.asarray(x) * (1 + a ** 2 / (2 * s) * dt)
                     + np.asarray(vv) * (1 + a ** 2 * (1 - s) / (2 * s)) * dt)
  hand = ((mean(v) - mean(v_ref)) ** 2).mean((1, 2, 3)) / (2 * a ** 2)
  np.testing.assert_allclose(kl, hand, rtol=1e-4)
  # The step's std is a·sqrt(-dt): step_kl = (-dt) · the per-dim Gaussian KL.
  mu, std = sampler.mean_std(v, t, tp, x)
  mu_ref, _ = sampler.mean_std(v_ref, t, tp, x)
  gauss = (np.square(np.asarray(mu - mu_ref)) / (2 * np.square(np.asarray(std)))).mean((1, 2, 3))
  np.testing.assert_allclose(kl, -dt * gauss, rtol=1e-4)
  assert float(sampler.step_kl(v, v, t, tp, x).max()) == 0.0
  with pytest.raises(ValueError, match="stochastic"):
    flow.FlowSampler(sampler.schedule, eta=0).step_kl(v, v_ref, t, tp, x)


def test_separable_grads_adds_the_step_kl_to_the_reference():
  from rft.objectives import trajectory
  sampler, model_fn, params, batch = _linear_flow_batch()
  scorer = trajectory.StepScorer(model_fn, sampler, 1.0)
  zero_loss = lambda lp, j, b: (0.0 * jnp.mean(lp), {"lp": jnp.mean(lp)})
  ident = lambda tr: tr
  theta = {"w": jnp.float32(-0.7), "b": jnp.float32(0.5)}
  loss, m, g = trajectory.separable_grads(scorer, ident, theta, batch, zero_loss,
                                          jax.random.key(0), kl_coef=0.5, ref_params=params)

  def hand(th):  # mean over steps of 0.5 * mean_i KL_j(i), written out with step_kl
    kls = []
    for j in range(4):
      x = batch["latents"][:, j]
      t, tp = batch["timesteps"][j], batch["prev_timesteps"][j]
      tv = jnp.full((3,), t)
      kls.append(jnp.mean(sampler.step_kl(model_fn(th, x, tv, None), model_fn(params, x, tv, None),
                                          t, tp, x)))
    return 0.5 * jnp.mean(jnp.stack(kls))

  value, grad = jax.value_and_grad(hand)(theta)
  # float32 means of differences of nearby step means: agree to ~1e-4 relative.
  np.testing.assert_allclose(float(loss), float(value), rtol=1e-3)
  np.testing.assert_allclose(float(m["kl"]), float(value) / 0.5, rtol=1e-3)
  for k in theta:
    np.testing.assert_allclose(float(g[k]), float(grad[k]), rtol=1e-3)
  # At the reference the KL and its gradient vanish, and the log-probs are the stored ones.
  loss0, m0, g0 = trajectory.separable_grads(scorer, ident, params, batch, zero_loss,
                                             jax.random.key(0), kl_coef=0.5, ref_params=params)
  assert float(m0["kl"]) == 0.0 and all(float(v) == 0.0 for v in jax.tree.leaves(g0))
  np.testing.assert_allclose(float(m0["lp"]), float(jnp.mean(batch["log_probs"])), rtol=1e-6)
  with pytest.raises(ValueError, match="ref_params"):
    trajectory.separable_grads(scorer, ident, params, batch, zero_loss, jax.random.key(0),
                               kl_coef=0.5)
