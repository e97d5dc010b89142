"""Objectives registered from outside rft/ run through the loops unchanged: a toy
diffusion objective and a toy LM loss, both defined in this file."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft import config as config_lib
from rft import pretrained
from rft.objectives import grpo, registry


@pytest.fixture
def toy_diffusion():
  calls = []

  def make_loss(config):
    def step_loss(lp_j, j, b):  # REINFORCE with a group-mean baseline, per step
      adv = b["toy_advantages"]
      return -jnp.mean(adv * lp_j), {"toy_adv_abs": jnp.mean(jnp.abs(adv))}
    return registry.TrajectoryLoss(per_step=True, fn=step_loss)

  def prepare(config, ids, scores, step_values, stats):
    B = config.samples_per_prompt
    assert np.all(ids.reshape(-1, B) == ids.reshape(-1, B)[:, :1])  # B samples per prompt
    assert step_values is None and stats is None
    g = np.asarray(scores, np.float32).reshape(-1, B)
    calls.append(len(scores))
    return ({"toy_advantages": (g - g.mean(1, keepdims=True)).reshape(-1)},
            {"toy_prepared": 1.0})

  registry.register_diffusion(registry.DiffusionObjective(
      name="toy_reinforce", kind="trajectory", summary="REINFORCE, group-mean baseline",
      make_loss=make_loss, prepare=prepare, needs_groups=True))
  yield calls
  registry.unregister("toy_reinforce")


def test_a_toy_objective_registered_here_runs_through_the_diffusion_loop(toy_diffusion,
                                                                         tmp_path):
  from rft.train import diffusion_rl
  # PRDP's generic settings (no step baselines: the toy objective takes none)
  config = config_lib.load("prdp", "all_captions,smoke")
  config.objective.name = "toy_reinforce"
  config.eval_every = 0
  results = diffusion_rl.train_and_evaluate(config, str(tmp_path))
  assert results["objective"] == "toy_reinforce"
  n = config.prompts_per_epoch * config.samples_per_prompt
  assert toy_diffusion == [n] * config.epochs  # prepare ran once per epoch on every sample
  assert all(np.isfinite(c["loss"]) for c in results["curve"].values())
  # The update moved the trained params (and only those: the text encoder is frozen).
  _, base, _ = pretrained.load_shapes_base()
  _, tuned, meta = pretrained.load_shapes_base(str(tmp_path))
  assert meta["objective"] == "toy_reinforce"
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(base["unet"]), jax.tree.leaves(tuned["unet"]))) > 0


def test_registry_rejects_unknown_names_and_duplicates(toy_diffusion):
  from rft.train import diffusion_rl
  config = config_lib.load("prdp", "smoke")
  config.objective.name = "nope"
  with pytest.raises(ValueError, match=r"'nope' is not a registered diffusion objective; "
                                       r"known: \['alignprop', 'ddpo', .*'toy_reinforce'\]"):
    diffusion_rl.validate(config)
  with pytest.raises(ValueError, match="'prdp' is already registered"):
    registry.register_diffusion(registry.diffusion("prdp"))
  with pytest.raises(ValueError, match="kind 'other' is not one of"):
    registry.DiffusionObjective(name="x", kind="other", summary="", make_loss=None)
  with pytest.raises(ValueError, match="needs a prepare"):
    registry.DiffusionObjective(name="x", kind="trajectory", summary="", make_loss=None)
  # A record's needs are checked by the loop: groups, and trajectory kinds need eta > 0.
  config.objective.name = "toy_reinforce"
  config.samples_per_prompt = 1
  with pytest.raises(ValueError, match="toy_reinforce needs config.samples_per_prompt >= 2"):
    diffusion_rl.validate(config)
  config.samples_per_prompt, config.sampler.eta = 2, 0.0
  with pytest.raises(ValueError, match="config.sampler.eta must be > 0"):
    diffusion_rl.validate(config)


def test_a_toy_lm_loss_registered_here_runs_through_the_lm_loop(tmp_path):
  calls = []

  def prepare(config, kw, rollout, group_size, term_weights):
    r = np.asarray(rollout["rewards"], np.float32)
    calls.append(len(r))
    # Weighted SFT: each completion weighted by its reward above the group's minimum.
    g = r.reshape(-1, group_size)
    w = (g - g.min(1, keepdims=True)).reshape(-1) * kw["scale"]
    return {"loss_weight": w.astype(np.float32)}, {"toy_weight_mean": float(w.mean())}

  def loss(kw, log_probs, mask, batch):
    return grpo.sft_loss(log_probs, mask), {"toy_tokens": jnp.sum(mask)}

  registry.register_lm(registry.LMObjective(
      name="toy_weighted_sft", summary="reward-weighted SFT", settings=lambda o: {"scale": 2.0},
      prepare=prepare, loss=loss, label=lambda config: "weighted_sft"))
  try:
    from rft.train import lm_rl
    config = config_lib.load("grpo", "smoke")
    config.objective.name = "toy_weighted_sft"
    config.eval_every = 0
    results = lm_rl.train_and_evaluate(config, str(tmp_path))
  finally:
    registry.unregister("toy_weighted_sft", lm_table=True)
  assert results["objective"] == "toy_weighted_sft" and results["loss"] == "weighted_sft"
  assert calls == [config.prompts_per_step * config.group_size] * config.steps
  config.objective.name = "toy_weighted_sft"  # unregistered again: a clear error
  with pytest.raises(ValueError, match=r"not a registered LM objective; known: \['copg', "
                                       r"'grpo', 'raft', 'rebel'\]"):
    lm_rl.validate(config)


def test_a_sampler_registered_here_is_built_by_name():
  import dataclasses

  from rft.diffusion import sampling
  from rft.diffusion.ddim import DDIMSampler
  from rft.diffusion.schedules import make_schedule
  calls = []

  @dataclasses.dataclass(frozen=True)
  class CountingDDIM(DDIMSampler):  # the same maths, counting traced steps
    def step(self, *args, **kw):
      calls.append(kw.get("prev_sample") is None)
      return super().step(*args, **kw)

  sampling.register("counting_ddim")(
      lambda schedule, eta, clip_x0, prediction: CountingDDIM(schedule, eta, clip_x0,
                                                              prediction=prediction))
  try:
    sched = make_schedule("scaled_linear", 1000)
    eps = lambda p, x, t, c: jnp.tanh(p * x + c)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    cond = jnp.ones((2, 1, 1, 1)) * 0.1
    kw = dict(num_steps=3, guidance_scale=1.0, key=jax.random.key(1))
    ours = sampling.SamplerConfig(num_steps=3, name="counting_ddim").build(sched)
    ref = sampling.SamplerConfig(num_steps=3).build(sched)
    a = sampling.rollout(eps, 0.5, ours, x_T, cond, None, **kw)
    b = sampling.rollout(eps, 0.5, ref, x_T, cond, None, **kw)
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.log_probs, b.log_probs)
    lp = sampling.trajectory_log_probs(eps, 0.5, ours, a, cond, None)
    np.testing.assert_array_equal(lp, a.log_probs)  # scored by the same step: ratio 1
    assert calls == [True, False]  # one traced sampling step (a scan), one scoring step
    with pytest.raises(ValueError, match="already registered"):
      sampling.register("ddim")(DDIMSampler.build)
  finally:
    sampling.SAMPLERS.pop("counting_ddim", None)
  with pytest.raises(ValueError, match=r"config.sampler.name='counting_ddim' is not a "
                                       r"registered sampler; known: \['ddim', 'flow', 'flow_cps'\]"):
    sampling.SamplerConfig(name="counting_ddim").build(sched)
