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
  # A shifted schedule shifts the training noise levels too: s sigma / (1 + (s - 1) sigma).
  loss3, _ = flow.flow_loss(model_fn, jnp.float32(0.5), x0, {"c": jnp.zeros((3, 1))}, None,
                            key, FlowSchedule(shift=3.0), cond_dropout=0, weighting="logit_normal")
  s3 = 3 * sigma / (1 + 2 * sigma)
  x_t3 = (1 - s3) * np.asarray(x0) + s3 * eps
  np.testing.assert_allclose(float(loss3), np.mean((0.5 * x_t3 - (eps - np.asarray(x0))) ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(seen["t"]), s3.ravel() * 1000, rtol=1e-5)
  assert (s3 > sigma).all()
  with pytest.raises(ValueError, match="needs mu"):
    flow.flow_loss(model_fn, jnp.float32(0.5), x0, {"c": jnp.zeros((3, 1))}, None, key,
                   FlowSchedule(use_dynamic_shifting=True), cond_dropout=0)


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


NFT_ARGS = ("--config.reward=brightness", "--config.objective.old_decay=(0.0, 0.25, 0.5)",
            "--config.eval_every=0")


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
  assert meta["schedule"] == {"name": "flow", "num_train_timesteps": 1000, "shift": 3.0}
  assert "dit" in params and "unet" not in params
  run = tmp_path / "prdp"
  # An untrained base draws noise, whose alignment reward is exactly 0 for every sample
  # (all pairs tied, no gradient); brightness differs between any two samples.
  # Judged with the deterministic Euler ODE whatever the rollout's noise level
  # (config.eval_sampler): a run rolling out at another eta evaluates the same samples.
  flow_args = ("--config.sampler.name=flow", "--config.reward=brightness",
               "--config.eval_sampler.eta=0")
  run_main("configs/prdp.py:all_captions,smoke", run, f"--config.base_dir={base}",
           "--config.sampler.eta=0.7", *flow_args)
  results = json.load(open(run / "results.json"))
  assert results["epochs"] == 2 and results["reward_queries"] > 0
  assert results["eval_sampler"]["eta"] == 0.0 and results["eval_sampler"]["name"] == "flow"
  other = tmp_path / "prdp_other_eta"
  run_main("configs/prdp.py:all_captions,smoke", other, f"--config.base_dir={base}",
           "--config.sampler.eta=0.3", "--config.epochs=1", *flow_args)
  first = json.load(open(other / "results.json"))["history"]["0"]
  assert first == results["history"]["0"] and first["train/config_reward"] > 0
  tuned, tuned_params, tuned_meta = pretrained.load_shapes_base(str(run))
  assert isinstance(tuned, TextToImageDiT)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned_params["dit"], params["dit"])
  assert max(jax.tree.leaves(moved)) > 0  # the DiT was trained
  np.testing.assert_array_equal(np.asarray(tuned_params["text"]["tok_embed"]["embedding"]),
                                np.asarray(params["text"]["tok_embed"]["embedding"]))
  # tests/test_sd3.py runs plain Flow-GRPO with its KL term end to end; MixGRPO below, in
  # the slow set.
  # DiffusionNFT end to end on this base (and its resume) is in the slow set below; its
  # loss and record run in process (test_nft_*).
  # A DDPM sampler on a flow model is a clear error naming what is wrong.
  p = run_main("configs/prdp.py:all_captions,smoke", tmp_path / "bad",
               f"--config.base_dir={base}", check=False)
  assert p.returncode != 0 and "velocity" in p.stderr


@pytest.mark.slow
def test_mixgrpo_and_a_resumed_nft_run_on_the_flow_base(tmp_path):
  """Flow-GRPO as MixGRPO (a 2-step SDE window in the 3-step smoke rollout) runs on the
  flow base; DiffusionNFT with a fast-moving sampling policy (d = 0.5 after the first
  epoch's 2 optimizer steps) resumed after epoch 1 ends where an uninterrupted run does:
  the lagged policy is in the checkpoint."""
  import json

  from rft import pretrained
  from tests.helpers import run_main
  base = tmp_path / "base"
  run_main("configs/pretrain_flow_shapes.py:smoke", base)
  run_main("configs/flow_grpo.py:smoke,mix", tmp_path / "mix", f"--config.base_dir={base}",
           "--config.reward=brightness", "--config.sde_window.every=1")
  results = json.load(open(tmp_path / "mix" / "results.json"))
  assert results["objective"] == "flow_grpo" and results["epochs"] == 2
  run_main("configs/nft.py:smoke", tmp_path / "nft", f"--config.base_dir={base}", *NFT_ARGS)
  run_main("configs/nft.py:smoke", tmp_path / "nft_r", f"--config.base_dir={base}", *NFT_ARGS,
           "--config.epochs=1")
  run_main("configs/nft.py:smoke", tmp_path / "nft_r", f"--config.base_dir={base}", *NFT_ARGS)
  _, straight, _ = pretrained.load_shapes_base(str(tmp_path / "nft"))
  _, resumed, _ = pretrained.load_shapes_base(str(tmp_path / "nft_r"))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params = pretrained.load_shapes_base(str(base))[1]
  assert max(jax.tree.leaves(jax.tree.map(  # DiffusionNFT trained the DiT
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      straight["dit"], params["dit"]))) > 0


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


def test_nft_loss_optimality_and_decay_by_hand():
  from rft.objectives import nft
  rng = np.random.RandomState(0)
  x0, x_t, v, v_old = (jnp.asarray(rng.randn(3, 2, 2, 1), jnp.float32) for _ in range(4))
  sigma = jnp.asarray([0.2, 0.5, 0.9], jnp.float32).reshape(3, 1, 1, 1)
  r = jnp.asarray([1.0, 0.0, 0.25])
  for beta in (1.0, 0.1):
    per, m = nft.nft_loss(v, v_old, x_t, x0, sigma, r, beta, 5.0)
    X0, XT, V, VO, S = (np.asarray(a, np.float64) for a in (x0, x_t, v, v_old, sigma))

    def term(vv):
      d = XT - S * vv - X0
      return (d ** 2).mean((1, 2, 3)) / np.maximum(np.abs(d).mean((1, 2, 3)), 1e-5)

    pos, neg = term(beta * V + (1 - beta) * VO), term((1 + beta) * VO - beta * V)
    hand = 5.0 * (np.asarray(r) * pos + (1 - np.asarray(r)) * neg) / beta
    np.testing.assert_allclose(np.asarray(per), hand, rtol=1e-5)
    np.testing.assert_allclose(float(m["positive_loss"]), pos.mean(), rtol=1e-5)
  # At beta = 1 and r = 1 the gradient is the weighted flow-matching one: toward x0.
  g = jax.grad(lambda vv: jnp.sum(nft.nft_loss(vv, v_old, x_t, x0, sigma, jnp.ones(3), 1.0,
                                               5.0)[0]))(v)
  d = np.asarray(x_t - sigma * v - x0)
  w = np.abs(d).mean((1, 2, 3), keepdims=True)
  np.testing.assert_allclose(np.asarray(g), 5.0 * 2 * d * (-np.asarray(sigma)) / w / 4, rtol=1e-5)
  # r = clip(clip(A, ±c) / 2c + 1/2, 0, 1).
  np.testing.assert_allclose(nft.optimality([-7.0, -5.0, 0.0, 2.5, 9.0], 5.0),
                             [0.0, 0.0, 0.5, 0.75, 1.0])
  # The reference's decay types 1 and 2.
  assert [nft.sampling_decay(s, 0, 0.001, 0.5) for s in (0, 100, 600)] == [0.0, 0.1, 0.5]
  assert nft.sampling_decay(74, 75, 0.0075, 0.999) == 0.0
  np.testing.assert_allclose(nft.sampling_decay(175, 75, 0.0075, 0.999), 0.75)
  assert nft.sampling_decay(10 ** 6, 75, 0.0075, 0.999) == 0.999


def test_nft_record_loss_on_a_toy_flow_pipeline():
  """The registered loss: k of the sampler's T noise levels per image, the sampling and
  reference params where the docstring puts them (checked against a hand version that
  draws the same levels and noise)."""
  from rft import config as config_lib
  from rft.diffusion import flow
  from rft.diffusion.pipeline import Text2ImagePipeline
  from rft.objectives import nft, registry
  obj = registry.diffusion("nft")
  assert obj.kind == "select_sft" and obj.sampling_decay is not None
  c = config_lib.load("nft", "smoke")
  c.sampler.num_steps = 4
  c.objective.timestep_fraction = 0.5
  c.objective.kl_coef = 0.3
  obj.check(c)
  sched = flow.FlowSchedule(num_train_timesteps=1000, shift=3.0)
  model_fn = lambda p, x, t, cond: p["w"] * x + p["b"] * (t / 1000.0)[:, None, None, None] + cond
  pipe = Text2ImagePipeline(lambda p, tok: tok, model_fn, sched, (2, 2, 1),
                            prediction="velocity")
  loss = obj.make_loss(c, pipe)
  rng = np.random.RandomState(1)
  b = {"images": jnp.asarray(rng.randn(3, 2, 2, 1), jnp.float32),
       "cond": jnp.asarray(rng.randn(3, 1, 1, 1), jnp.float32),
       "optimality": jnp.asarray([0.9, 0.1, 0.5])}
  theta, old, ref = ({"w": jnp.float32(w), "b": jnp.float32(bb)}
                     for w, bb in ((-0.8, 0.2), (-0.6, 0.4), (-1.0, 0.0)))
  key = jax.random.key(5)
  value, m = loss(theta, b, key, sampling_params=old, ref_params=ref)
  t_grid = np.asarray(flow.FlowSampler(sched).timesteps(4)[0])
  k_perm, k_noise = jax.random.split(key)
  order = np.asarray(jax.vmap(lambda kk: jax.random.permutation(kk, 4))(jax.random.split(k_perm, 3)))
  vals = []
  for j in range(2):  # round(0.5 * 4) levels
    t = jnp.asarray(t_grid[order[:, j]])
    sigma = (t / 1000).reshape(3, 1, 1, 1)
    eps = jax.random.normal(jax.random.fold_in(k_noise, j), (3, 2, 2, 1))
    x_t = (1 - sigma) * b["images"] + sigma * eps
    per, _ = nft.nft_loss(model_fn(theta, x_t, t, b["cond"]), model_fn(old, x_t, t, b["cond"]),
                          x_t, b["images"], sigma, b["optimality"], 1.0, 5.0)
    kl = jnp.mean(jnp.square(model_fn(theta, x_t, t, b["cond"]) - model_fn(ref, x_t, t, b["cond"])))
    vals.append(float(jnp.mean(per)) + 0.3 * float(kl))
  np.testing.assert_allclose(float(value), np.mean(vals), rtol=1e-5)
  assert float(m["kl"]) > 0
  for key_, bad, match in (("objective.beta", 0.0, "beta"), ("objective.old_decay", (0, 0.1, 1.0),
                                                              "old_decay"),
                           ("sampler.name", "ddim", "flow")):
    cc = config_lib.load("nft", "smoke")
    section, name = key_.split(".")
    cc[section][name] = bad
    with pytest.raises(ValueError, match=match):
      obj.check(cc)


def test_sde_window_schedule_by_hand():
  from rft.objectives.trajectory import sde_window_start
  # 10 steps, window 4: starts 0..6, one step every 2 epochs, then around again.
  starts = [sde_window_start(e, 10, 4, 1, 2, True) for e in range(16)]
  assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0]
  assert [sde_window_start(e, 10, 4, 1, 2, False) for e in (13, 14, 99)] == [6, 6, 6]
  assert [sde_window_start(e, 10, 4, 3, 1, True) for e in range(5)] == [0, 3, 6, 0, 3]


def test_mixed_ode_sde_rollout_and_window_gradients():
  """Window steps are the SDE sampler's, the others its ODE (eta 0) from the same model
  output, with log-probs 0; an all-SDE mask is the plain rollout bit for bit; the window's
  gradients are those of its steps alone."""
  import dataclasses

  from rft.diffusion import sampling
  from rft.objectives import trajectory
  sampler, model_fn, params, _ = _linear_flow_batch()
  x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  key = jax.random.key(1)
  mask = jnp.asarray([False, True, True, False])
  run = lambda m: sampling.rollout(model_fn, params, sampler, x_T, None, None, num_steps=4,
                                   key=key, sde_steps=m)
  plain = sampling.rollout(model_fn, params, sampler, x_T, None, None, num_steps=4, key=key)
  full = run(jnp.ones(4, bool))
  np.testing.assert_array_equal(np.asarray(full.latents), np.asarray(plain.latents))
  np.testing.assert_array_equal(np.asarray(full.log_probs), np.asarray(plain.log_probs))
  mixed = run(mask)
  ode = dataclasses.replace(sampler, eta=0)
  keys = jax.random.split(key, 4)
  ts, tps = sampler.timesteps(4)
  x = x_T
  for j in range(4):
    out = model_fn(params, x, jnp.full((3,), ts[j]), None)
    if mask[j]:
      x, (lp, _) = sampler.step(out, ts[j], tps[j], x, key=keys[j])
      np.testing.assert_allclose(np.asarray(mixed.log_probs[:, j]), np.asarray(lp), rtol=1e-6)
    else:
      x, _ = ode.step(out, ts[j], tps[j], x, log_prob=False)
      assert float(jnp.abs(mixed.log_probs[:, j]).max()) == 0.0
    np.testing.assert_allclose(np.asarray(mixed.latents[:, j + 1]), np.asarray(x), atol=1e-5)
  # Gradients restricted to the window's steps.
  batch = {"latents": mixed.latents, "timesteps": mixed.timesteps,
           "prev_timesteps": mixed.prev_timesteps, "log_probs": mixed.log_probs,
           "cond": None, "null_cond": None}
  scorer = trajectory.StepScorer(model_fn, sampler, 1.0)
  step_loss = lambda lp, j, b: (-jnp.mean(lp), {})
  theta = {"w": jnp.float32(-0.7), "b": jnp.float32(0.5)}
  _, _, g = trajectory.separable_grads(scorer, lambda t: t, theta, batch, step_loss,
                                       jax.random.key(2), steps=jnp.asarray([1, 2]))
  hand = jax.grad(lambda th: -0.5 * sum(jnp.mean(scorer.step(th, batch, j)) for j in (1, 2)))(theta)
  for k in theta:
    np.testing.assert_allclose(float(g[k]), float(hand[k]), rtol=1e-5)
  coupled = lambda lp, b: (-jnp.sum(lp), {})
  _, _, gc = trajectory.coupled_grads(scorer, lambda t: t, theta, batch, coupled,
                                      jax.random.key(2), steps=jnp.asarray([1, 2]))
  hand_c = jax.grad(lambda th: -sum(jnp.sum(scorer.step(th, batch, j)) for j in (1, 2)))(theta)
  for k in theta:
    np.testing.assert_allclose(float(gc[k]), float(hand_c[k]), rtol=1e-5)


def test_the_flow_configs_start_from_the_shipped_flow_base():
  """Flow-GRPO and DiffusionNFT default to rft/assets/flow: a DiT with the flow schedule
  shifted by 3 (configs/pretrain_flow_shapes.py's default), 5,000 steps, whose recorded
  evaluation is at least half aligned on training captions."""
  from rft import config as config_lib
  from rft import pretrained
  for name in ("flow_grpo", "nft"):
    assert config_lib.load(name).base_dir == "assets/flow"
  model, params, meta = pretrained.load_shapes_base("assets/flow")
  assert isinstance(model, TextToImageDiT) and meta["steps"] == 5000
  assert meta["schedule"] == {"name": "flow", "num_train_timesteps": 1000, "shift": 3.0}
  assert meta["results"]["train/alignment"] >= 0.5 and meta["results"]["heldout/alignment"] > 0.25
  assert config_lib.load("pretrain_flow_shapes").flow_shift == meta["schedule"]["shift"]


def test_evaluation_sampler_overrides_only_what_is_set():
  """config.eval_sampler replaces the rollout sampler's eta / guidance scale where it is
  >= 0 and keeps the rest; keys it does not hold are an error naming them."""
  from ml_collections import config_dict

  from rft.diffusion.sampling import SamplerConfig
  from rft.train.diffusion_rl import evaluation_sampler
  rollout = SamplerConfig(num_steps=10, eta=0.7, guidance_scale=1.5, clip_x0=1.0, name="flow")
  c = config_dict.ConfigDict({"eval_sampler": {"eta": -1.0, "guidance_scale": -1.0}})
  assert evaluation_sampler(c, rollout) == rollout
  c.eval_sampler.eta = 0.0
  assert evaluation_sampler(c, rollout) == SamplerConfig(10, 0.0, 1.5, 1.0, "flow")
  c.eval_sampler.guidance_scale = 3.0
  assert evaluation_sampler(c, rollout) == SamplerConfig(10, 0.0, 3.0, 1.0, "flow")
  assert evaluation_sampler(config_dict.ConfigDict(), rollout) == rollout  # older configs
  c.eval_sampler.num_steps = 40
  assert evaluation_sampler(c, rollout) == SamplerConfig(40, 0.0, 3.0, 1.0, "flow")
  c.eval_sampler.num_steps = 0
  with pytest.raises(ValueError, match="num_steps=0"):
    evaluation_sampler(c, rollout)
  c.eval_sampler = {"eta": 0.0, "clip_x0": 2.0}
  with pytest.raises(ValueError, match="clip_x0"):
    evaluation_sampler(c, rollout)


@pytest.mark.parametrize("config", ["flow_grpo:sd35_pickscore", "nft:sd35_pickscore"])
def test_sd35_paper_settings_without_the_weights_fail_at_once_naming_the_model(
    config, tmp_path, monkeypatch):
  """The SD3.5-Medium variants need the diffusers folder; without it the run stops before
  any work with an error naming the hub id and the command that fetches it."""
  from rft import config as config_lib
  from rft.train.diffusion_rl import train_and_evaluate
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  c = config_lib.load(*config.split(":"))
  with pytest.raises(FileNotFoundError) as e:
    train_and_evaluate(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "'stabilityai/stable-diffusion-3.5-medium'" in msg
  assert "hf download stabilityai/stable-diffusion-3.5-medium" in msg
  assert not (tmp_path / "run" / "checkpoints").exists()
