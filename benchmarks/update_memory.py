"""W2: compiled peak memory of one update vs the number of denoising steps T.

Workload W2 of ../shared/BENCHMARKS.md: XLA's memory analysis of the compiled update
(`jit(...).lower(...).compile().memory_analysis()`), no run needed, at T=10 and T=50:

* PRDP update: ours (rft.objectives.trajectory.coupled_grads: forward pass for the pair
  residuals, then per-step gradients accumulated in a scan) vs the naive version (one
  value_and_grad through all T steps' log-probs).
* Reward backprop: DRaFT-1 (ours: first T-1 steps without gradients) and full backprop
  through all T steps with `jax.checkpoint` per step (ours, as AlignProp at K=T) vs the
  same without checkpointing (naive).

Model: the W1 shape (latents 4x32x32, batch 8, channels 32/64, cross-attention at the
64-channel level, text states 8x64, CFG 5 in one batched call) built from rft's own
TextToImage UNet (parameter count printed). Peak = arguments + outputs + temporaries.

Flow updates (`--flow`, T=10 vs T=40 by default): the same latents through a DiT
(rft.models.dit: 2x2 patches = 256 tokens, width 128, depth 4) on the Flow-GRPO SDE
(rft.diffusion.flow, noise level 0.7, CFG 4.5):

* Flow-GRPO update (ours: rft.objectives.trajectory.separable_grads, per-step gradients
  accumulated in a scan, with the KL term's extra forward of the frozen reference) vs
  the naive version (one value_and_grad of the summed per-step losses);
* PRDP on the flow SDE (coupled_grads) vs its naive version.

  python benchmarks/update_memory.py [--steps 10 50]
  python benchmarks/update_memory.py --flow [--steps 10 40]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from rft.diffusion import ddim, flow, sampling
from rft.diffusion.schedules import make_schedule
from rft.models.dit import TextToImageDiT
from rft.models.t2i import TextToImage, make_eps_fn
from rft.objectives import ddpo, prdp, trajectory

BATCH, GROUP, LAT, TEXT_LEN, TEXT_DIM, CFG = 8, 4, (32, 32, 4), 8, 64, 5.0


def build():
  model = TextToImage(vocab_size=64, max_len=TEXT_LEN, text_width=TEXT_DIM, text_depth=1,
                      text_heads=4, channels=(32, 64), num_res_blocks=1, attn_levels=(1,),
                      self_attn_levels=(1,), emb_dim=128, out_channels=LAT[-1])
  x = jnp.zeros((1, *LAT))
  params = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, TEXT_LEN), jnp.int32))["params"]
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["unet"]))
  return model, params, n


def peak_bytes(fn, *args) -> int:
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def build_dit():
  model = TextToImageDiT(vocab_size=64, max_len=TEXT_LEN, text_width=TEXT_DIM, text_depth=1,
                         text_heads=4, patch=2, width=128, depth=4, num_heads=4,
                         out_channels=LAT[-1])
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *LAT)),
                          jnp.zeros((1,), jnp.float32),
                          jnp.zeros((1, TEXT_LEN), jnp.int32))["params"]
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["dit"]))
  return model, params, n


def batch_spec(T, time_dtype=jnp.int32):
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct
  return {"latents": sds((BATCH, T + 1, *LAT), f32), "timesteps": sds((T,), time_dtype),
          "prev_timesteps": sds((T,), time_dtype), "log_probs": sds((BATCH, T), f32),
          "ref_log_probs": sds((BATCH, T), f32), "rewards": sds((BATCH,), f32),
          "cond": {"states": sds((BATCH, TEXT_LEN, TEXT_DIM), f32),
                   "mask": sds((BATCH, TEXT_LEN), jnp.bool_)},
          "null_cond": {"states": sds((1, TEXT_LEN, TEXT_DIM), f32),
                        "mask": sds((1, TEXT_LEN), jnp.bool_)},
          "advantages": sds((BATCH,), f32)}


def prdp_memory(model, params, T):
  sched = make_schedule("scaled_linear", 1000)
  scorer = trajectory.StepScorer(make_eps_fn(model), ddim.DDIMSampler(sched, eta=1.0), CFG)

  def loss(lp, b):
    return prdp.rdp_loss(lp, b["log_probs"], b["ref_log_probs"], b["rewards"],
                        group_size=GROUP, beta=1e-3, clip_eps=1e-3)

  ours = lambda p, b, k: trajectory.coupled_grads(scorer, lambda q: q, p, b, loss, k)
  naive = lambda p, b: trajectory.naive_coupled_grads(scorer, lambda q: q, p, b, loss)
  b = batch_spec(T)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return peak_bytes(ours, params, b, key), peak_bytes(naive, params, b)


def backprop_memory(model, params, T):
  sched = make_schedule("scaled_linear", 1000)
  eps_fn = make_eps_fn(model)
  sds = jax.ShapeDtypeStruct
  x_T = sds((BATCH, *LAT), jnp.float32)
  cond = {"states": sds((BATCH, TEXT_LEN, TEXT_DIM), jnp.float32),
          "mask": sds((BATCH, TEXT_LEN), jnp.bool_)}
  null = {"states": sds((1, TEXT_LEN, TEXT_DIM), jnp.float32),
          "mask": sds((1, TEXT_LEN), jnp.bool_)}
  kw = dict(num_steps=T, guidance_scale=CFG)
  sampler = ddim.DDIMSampler(sched, eta=1.0)

  def ours(k_steps):
    def f(p, x, c, n):
      def loss(q):
        x0 = sampling.truncated_rollout(eps_fn, q, sampler, x, c, n, jax.random.key(0),
                                        grad_steps=k_steps, **kw)
        return jnp.mean(x0 ** 2)
      return jax.grad(loss)(p)
    return f

  def naive(p, x, c, n):
    def loss(q):
      traj = sampling.rollout(eps_fn, q, sampler, x, c, n, key=jax.random.key(0), **kw)
      return jnp.mean(traj.sample ** 2)
    return jax.grad(loss)(p)

  args = (params, x_T, cond, null)
  return (peak_bytes(ours(1), *args), peak_bytes(ours(T), *args), peak_bytes(naive, *args))


FLOW_CFG, FLOW_ETA, FLOW_KL = 4.5, 0.7, 0.04  # Flow-GRPO's SD3.5 settings


def flow_memory(model, params, T):
  """(Flow-GRPO ours, Flow-GRPO naive, PRDP-flow ours, PRDP-flow naive) peak bytes."""
  scorer = trajectory.StepScorer(make_eps_fn(model), flow.FlowSampler(flow.FlowSchedule(),
                                                                      eta=FLOW_ETA), FLOW_CFG)
  step_loss = ddpo.trajectory_loss(1e-4, 5.0).fn
  b = batch_spec(T, jnp.float32)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

  def grpo_ours(p, ref, b, k):
    return trajectory.separable_grads(scorer, lambda q: q, p, b, step_loss, k,
                                      kl_coef=FLOW_KL, ref_params=ref)

  def grpo_naive(p, ref, b):
    def total(q):  # one gradient through a scan over the steps: its residuals are kept
      def body(acc, j):
        lp, kl = scorer.step_kl(q, ref, b, j)
        return acc + step_loss(lp, j, b)[0] + FLOW_KL * jnp.mean(kl), None
      return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(T))[0] / T
    return jax.value_and_grad(total)(p)

  def rdp(lp, b):
    return prdp.rdp_loss(lp, b["log_probs"], b["ref_log_probs"], b["rewards"],
                         group_size=GROUP, beta=1e-3, clip_eps=1e-3)

  prdp_ours = lambda p, b, k: trajectory.coupled_grads(scorer, lambda q: q, p, b, rdp, k)
  prdp_naive = lambda p, b: trajectory.naive_coupled_grads(scorer, lambda q: q, p, b, rdp)
  return (peak_bytes(grpo_ours, params, params, b, key), peak_bytes(grpo_naive, params, params, b),
          peak_bytes(prdp_ours, params, b, key), peak_bytes(prdp_naive, params, b))


def report(rows, names, t0, t1):
  mib = lambda b: f"{b / 2**20:8.1f} MiB"
  print(f"{'update':40s} {'T=' + str(t0):>12s} {'T=' + str(t1):>12s} {'ratio':>7s}")
  for i, name in enumerate(names):
    lo, hi = rows[t0][i], rows[t1][i]
    print(f"{name:40s} {mib(lo)} {mib(hi)} {hi / lo:6.2f}x")


def main_flow(steps):
  model, params, n = build_dit()
  print(f"W2 flow model: rft DiT, {n / 1e6:.2f} M params, latents {LAT} ({LAT[0] * LAT[1] // 4} "
        f"tokens), batch {BATCH}, CFG {FLOW_CFG}, SDE noise level {FLOW_ETA}, KL coef "
        f"{FLOW_KL}; backend {jax.default_backend()}")
  t0, t1 = steps
  rows = {T: flow_memory(model, params, T) for T in (t0, t1)}
  report(rows, ["Flow-GRPO update (ours: step-wise)", "Flow-GRPO update (naive: one grad)",
                "PRDP on the flow SDE (ours)", "PRDP on the flow SDE (naive)"], t0, t1)
  print(f"T={t1}: Flow-GRPO naive / ours = {rows[t1][1] / rows[t1][0]:.2f}x; "
        f"PRDP-flow naive / ours = {rows[t1][3] / rows[t1][2]:.2f}x")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, nargs=2, default=None,
                  help="two step counts T (default: 10 50; with --flow 10 40)")
  ap.add_argument("--flow", action="store_true", help="the flow updates on a DiT instead")
  a = ap.parse_args()
  if a.flow:
    return main_flow(a.steps or (10, 40))
  a.steps = a.steps or (10, 50)
  model, params, n = build()
  print(f"W2 model: rft UNet, {n / 1e6:.2f} M params, latents {LAT}, batch {BATCH}, CFG {CFG}; "
        f"backend {jax.default_backend()}")
  t0, t1 = a.steps
  rows = {}
  for T in (t0, t1):
    rows[T] = prdp_memory(model, params, T) + backprop_memory(model, params, T)
  report(rows, ["PRDP update (ours: step-wise)", "PRDP update (naive: one grad)",
                "DRaFT-1 (ours)", "full backprop, checkpointed (ours)", "full backprop (naive)"],
         t0, t1)
  print(f"T={t1}: PRDP naive / ours = {rows[t1][1] / rows[t1][0]:.2f}x; "
        f"full backprop naive / checkpointed = {rows[t1][4] / rows[t1][3]:.2f}x")


if __name__ == "__main__":
  main()
