"""The real PRDP, DRaFT and GRPO updates on sharded meshes equal the one-device update.

One subprocess per update with 8 fake CPU devices. The update builders are used
unchanged (`diffusion_updates.make_trajectory_update`, `diffusion_updates.make_backprop_update`,
`lm_rl.make_update`, each a `jax.jit` with no explicit shardings): the state, the frozen
base params and the batch are placed with `placement.shard_tree` /
`placement.shard_batch_axes` and GSPMD propagates those placements through the update.
Meshes: {data: 8} (params replicated) and {data: 2, fsdp: 2, tensor: 2} (params
FSDP-sharded, attention tensor-parallel), plus {fsdp: 8} in the slow variant; loss
(relative) and every new param must match the one-device run to 1e-5, and the params
must really be split.

The test optimizer is the loops' AdamW (global-norm clip, constant lr) with lr 1e-3, so
params move ~1e-3 and the 1e-5 tolerance means something, and Adam eps 1e-5 instead of
1e-8: an entry whose gradient is rounding noise (different for every reduction order)
moves by ~lr * g / (|g| + eps), a whole lr step at eps 1e-8 (measured for GRPO: max
param difference 3e-4 at eps 1e-8, 5e-6 at 1e-5). Pass an eps as the script's second
argument to see it.
"""
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rft import placement
from rft import sharding as S
from tests.helpers import run_python

COMMON = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from rft import config as config_lib, placement, pretrained, sharding as S
    from rft.train.state import TrainState
    assert jax.device_count() == 8
    MIXED = {"data": 2, "fsdp": 2, "tensor": 2}
    # CI: data-parallel and the mixed mesh (FSDP and tensor parallelism together); the
    # slow variant adds pure FSDP over all 8 devices.
    MESHES = (({"data": 8}, {"fsdp": 8}, MIXED) if len(sys.argv) > 3 and sys.argv[3] == "all"
              else ({"data": 8}, MIXED))
    N = 8  # rows per update: divisible by every mesh's data-parallel size

    def n_split(tree, mesh=None):
      # leaves not replicated; with a `tensor` mesh axis, some leaf must be split over it
      specs = [x.sharding.spec for x in jax.tree.leaves(tree)]
      if mesh is not None and "tensor" in mesh.shape:
        assert any("tensor" in jax.tree.leaves(tuple(s)) for s in specs), specs
      return sum(s != P() for s in specs)

    def compare(name, run):
      # run(mesh) -> (losses, new params on host, #sharded input params, #sharded output params)
      t0 = time.time()
      l1, p1, _, _ = run(placement.make_mesh({"data": 1}, jax.devices()[:1]))
      print("TIME", name, "one device", round(time.time() - t0, 1), flush=True)
      for axes in MESHES:
        t1 = time.time()
        ln, pn, s_in, s_out = run(placement.make_mesh(axes))
        print("TIME", name, axes, round(time.time() - t1, 1), flush=True)
        dl = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(l1, ln))  # relative
        dp = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                              jax.tree.leaves(pn)))
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                                 jax.tree.leaves(P0[name])))
        print(f"UPDATE {name} {axes} losses {l1} max rel dloss {dl:.2e} max dparams {dp:.2e} "
              f"(params moved {moved:.2e}) sharded params in/out {s_in}/{s_out}", flush=True)
        sharded = "fsdp" in axes
        if not (moved > 5e-4 and (s_in > 0) == sharded and (s_out > 0) == sharded
                and dl < 1e-5 and dp < 1e-5):
          FAILED.append((name, axes))
      print("TIME", name, round(time.time() - t0, 1), flush=True)
    P0, FAILED = {}, []
    # lr 1e-3: params move ~1e-3 per update, so the 1e-5 tolerance is a real test.
    LR = 1e-3
    # Adam moves an entry by ~lr * g / (|g| + eps); where g is rounding noise (differs
    # with the reduction order of each mesh) eps = 1e-8 turns it into a full lr step.
    EPS = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-5

    def make_tx(config):
      # make_optimizer's AdamW (constant lr, global-norm clip) with eps = EPS
      tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adamw(config.lr, config.adam_b1, config.adam_b2, eps=EPS,
                                   weight_decay=config.weight_decay))
      return tx
""")

DIFFUSION_SCRIPT = COMMON + textwrap.dedent("""
    from rft.data import shapes
    from rft.diffusion.pipeline import SamplerConfig, shapes_pipeline
    from rft.diffusion.schedules import make_schedule
    from rft.objectives import registry, trajectory
    from rft.rewards import base as rewards_lib
    from rft.train import diffusion_rl, diffusion_updates
    model, base, meta = pretrained.load_shapes_base()
    pipe = shapes_pipeline(model, make_schedule(**meta["schedule"]), shapes.IMAGE_SIZE)
    world, tok = shapes.ShapesWorld(), shapes.tokenizer()
    # FSDP by size (small min_size: this UNet is small) plus Megatron-style tensor
    # parallelism for its attention projections (column-parallel q/k/v, row-parallel out).
    RULES = S.ShardingRules(rules=(
        (r"(self|cross)_attn/(q|k|v)/kernel$", (None, "tensor")),
        (r"(self|cross)_attn/out/kernel$", ("tensor", None)),
    ), min_size=2 ** 10)
    rng = np.random.default_rng(0)

    def run_update(update, state, batch, extra, mesh, keys):
      # The trainable tree is a subtree of the base tree: both follow the same rules.
      base_s = placement.shard_tree(base, RULES, mesh)
      st = placement.shard_tree(state, RULES, mesh)
      b = placement.shard_batch_axes(batch, mesh, batch_size=N)
      s_in = n_split(st.params, mesh)
      assert jax.tree.leaves(b)[0].sharding.spec == S.batch_spec(mesh, jax.tree.leaves(b)[0].ndim)
      losses = []
      with placement.use_mesh(mesh):
        for i, k in enumerate(keys):
          st, m = update(st, base_s, b, k, *extra(i, mesh))
          losses.append(float(m["loss"]))
      return losses, jax.device_get(st.params), s_in, n_split(st.params)

    if sys.argv[1] in ("all", "prdp"):
      # PRDP: 2 prompts x 4 samples, a 3-step DDIM rollout; one on-policy update.
      config = config_lib.load("prdp", "smoke")
      config.lr, config.unroll = LR, "none"
      sampler = SamplerConfig(**dict(config.sampler))
      trainable, materialize, tx = diffusion_rl.setup_finetuning(config, base, jax.random.key(1))
      tx = make_tx(config)  # the trainable tree holds only the selected leaves
      ids = np.repeat(world.sample_prompt_ids(rng, N // config.samples_per_prompt), config.samples_per_prompt)
      tokens = jnp.asarray(tok.encode([world.texts[i] for i in ids]))
      traj, cond, null = jax.jit(lambda p, t, k: pipe.sample(p, t, k, sampler))(base, tokens, jax.random.key(2))
      batch = jax.device_get({
          "latents": traj.latents, "timesteps": traj.timesteps,
          "prev_timesteps": traj.prev_timesteps, "log_probs": traj.log_probs,
          "cond": cond, "null_cond": null,
          "rewards": rng.normal(size=N).astype(np.float32),
          # theta_old == base here: the reference log-probs are the rollout's
          "ref_log_probs": traj.log_probs})
      scorer = trajectory.StepScorer(pipe.eps_fn, sampler.build(pipe.schedule),
                                     sampler.guidance_scale, reduce="mean")
      update = diffusion_updates.make_trajectory_update(
          config, scorer, registry.diffusion("prdp").make_loss(config), materialize, tx)
      state = jax.device_get(TrainState.create(trainable, tx))
      P0["prdp"] = state.params
      def prdp_run(mesh):
        upd = lambda st, b_, bt, k: update(st, b_, bt, k, on_policy=True)
        return run_update(upd, state, batch, lambda i, m: (), mesh, [jax.random.key(10)])
      compare("prdp", prdp_run)

    if sys.argv[1] in ("all", "draft"):
      # DRaFT-1: 8 prompts, reward gradient through the last of 3 DDIM steps.
      config = config_lib.load("draft", "smoke")
      # (lr 1e-2: DRaFT's gradients are mostly below Adam's eps, steps ~ lr * g / eps)
      config.lr, config.unroll = 10 * LR, "none"
      sampler = SamplerConfig(**dict(config.sampler))
      reward = rewards_lib.build(config.reward, scorer_dir=None)
      trainable, materialize, tx = diffusion_rl.setup_finetuning(config, base, jax.random.key(1))
      tx = make_tx(config)  # the trainable tree holds only the selected leaves
      ids = world.sample_prompt_ids(rng, N)
      tokens = tok.encode([world.texts[i] for i in ids])
      cond, null = jax.jit(pipe.conditions)(base, jnp.asarray(tokens))
      batch = jax.device_get({"tokens": tokens, "cond": cond, "null_cond": null,
                              "prompts": {"ids": ids, "tokens": tokens,
                                          "assignments": world.assignments(ids)}})
      rollout = registry.diffusion("draft").make_loss(
          config, diffusion_updates.sampler_kwargs(pipe.sampler(sampler), sampler))
      update = diffusion_updates.make_backprop_update(config, pipe, sampler, reward, rollout,
                                                 materialize, tx)
      state = jax.device_get(TrainState.create(trainable, tx))
      reward_params = jax.device_get(reward.params)
      P0["draft"] = state.params
      def draft_run(mesh):
        return run_update(update, state, batch,
                          lambda i, m: (placement.replicate(reward_params, m),), mesh,
                          [jax.random.key(20)])
      compare("draft", draft_run)
    assert not FAILED, FAILED
    print("OK")
""")

LM_SCRIPT = COMMON + textwrap.dedent("""
    from rft.train import lm_rl
    cfg, base, meta = pretrained.load_arith_base()
    config = config_lib.load("grpo", "smoke,kl")  # GRPO clipped surrogate + k3 KL to ref
    config.lr = LR
    tx = make_tx(config)
    update = lm_rl.make_update(cfg, config, tx)
    rng = np.random.default_rng(0)
    Lp, Lc = 7, 6
    prompt_mask = np.ones((N, Lp), np.int32)
    prompt_mask[::2, :2] = 0  # left padding on half the rows
    completion_mask = (np.arange(Lc)[None] < rng.integers(2, Lc + 1, N)[:, None]).astype(np.float32)
    batch = {"prompt": rng.integers(1, cfg.vocab_size, (N, Lp)).astype(np.int32) * prompt_mask,
             "prompt_mask": prompt_mask,
             "completion": rng.integers(1, cfg.vocab_size, (N, Lc)).astype(np.int32),
             "completion_mask": completion_mask,
             "loss_weight": np.ones(N, np.float32),
             "advantages": rng.normal(size=N).astype(np.float32)}
    T = config.sampling.temperature
    old, _ = jax.jit(lambda p, b: lm_rl.policy_log_probs(cfg, T, p, b))(base, batch)
    batch["old_log_probs"] = np.asarray(old)
    batch["ref_log_probs"] = np.asarray(old) + rng.normal(scale=0.05, size=old.shape).astype(np.float32)
    batch["prompt_mask"] = batch["prompt_mask"].astype(bool)
    state = jax.device_get(TrainState.create(base, tx))
    P0["grpo"] = state.params
    RULES = S.LM_RULES.replace(min_size=2 ** 10)

    def grpo_run(mesh):
      st = placement.shard_tree(state, RULES, mesh)
      b = placement.shard_batch_axes(batch, mesh)
      s_in = n_split(st.params, mesh)
      losses = []
      with placement.use_mesh(mesh):
        for _ in range(2):
          st, m = update(st, b)
          losses.append(float(m["loss"]))
      return losses, jax.device_get(st.params), s_in, n_split(st.params)
    compare("grpo", grpo_run)
    try:
      placement.shard_batch_axes({"x": np.zeros((6, 2))}, placement.make_mesh(MIXED))
      raise SystemExit("indivisible batch accepted")
    except ValueError as e:
      assert "not divisible by the 4 devices of mesh axes ('data', 'fsdp')" in str(e), e
    assert not FAILED, FAILED
    print("OK")
""")


@pytest.mark.parametrize("meshes", ["ci", pytest.param("all", marks=pytest.mark.slow)])
@pytest.mark.parametrize("update", ["prdp", "draft", "grpo"])
def test_sharded_update_equals_one_device(update, meshes):
  script = LM_SCRIPT if update == "grpo" else DIFFUSION_SCRIPT
  p = run_python(["-c", script, update, "1e-5", meshes], devices=8, timeout=600)
  print(p.stdout)
  assert "OK" in p.stdout, p.stdout + p.stderr[-2000:]
  assert p.stdout.count("UPDATE") == (3 if meshes == "all" else 2)  # one line per mesh


def test_shard_tree_and_batch_axes_one_device():
  """The helpers' placement rules on a 1-device mesh (specs only) and their errors."""
  mesh = placement.make_mesh({"fsdp": 1}, jax.devices()[:1])
  params = {"w": np.ones((64, 32), np.float32), "b": np.zeros(32, np.float32)}
  out = placement.shard_tree(params, S.DEFAULT_RULES.replace(min_size=0), mesh)
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(out))  # fsdp=1: nothing to split
  specs = {"w": P("fsdp"), "b": P()}
  out = placement.shard_tree(params, specs, mesh)
  assert out["w"].sharding.spec == P("fsdp") and out["b"].sharding.spec == P()
  import optax
  from rft.train.state import TrainState
  st = placement.shard_tree(TrainState.create(params, optax.adam(1e-3)), specs, mesh)
  assert st.params["w"].sharding.spec == P("fsdp") and st.step.sharding.spec == P()
  assert st.opt_state[0].mu["w"].sharding.spec == P("fsdp") and st.ema_params is None
  np.testing.assert_array_equal(st.params["w"], params["w"])
  b = placement.shard_batch_axes({"x": np.arange(8.0).reshape(4, 2), "t": np.arange(3)}, mesh,
                                batch_size=4)
  assert b["x"].sharding.spec == P(("fsdp",), None) and b["t"].sharding.spec == P()
  with pytest.raises(ValueError, match="no batch dimension"):
    placement.shard_batch_axes({"s": np.float32(1.0)}, mesh)
  m2 = placement.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  assert placement.shard_batch_axes({"x": np.zeros((3, 2))}, m2)["x"].sharding.spec == \
      P(("data", "fsdp"), None)
