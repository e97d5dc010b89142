"""Gradient noise scale of PRDP's update: how many samples one useful step needs.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): with G the true
gradient and Σ the covariance of one sample's gradient,

    B_simple = tr(Σ) / |G|²

is the batch size at which an update's noise energy equals its signal energy. Far below
it, steps are mostly noise, and progress per sample is the same whatever the batch.

Estimated here from m independent gradient estimates g_1..g_m, each on n samples:

    |G|²      ≈ (|Σ_e g_e|² − Σ_e |g_e|²) / (m (m − 1))   (cross terms only: unbiased)
    tr(Σ) / n ≈ mean_e |g_e|² − |G|²
    B_simple  ≈ n · (tr(Σ) / n) / |G|²

The "Adam-like" column first divides every coordinate by its rms over the m estimates:
Adam moves every coordinate by about lr, so what matters for it is the per-coordinate
signal, not the few large coordinates that dominate the raw norm.

The gradient is PRDP's (`rft.objectives.prdp`, the config's β, B samples per prompt) at
the config's base model, on fresh rollouts, one transition at a time, so any range of
steps can be summed afterwards (e.g. what `skip_last_steps` leaves):

    python -m rft.tools.noise_scale --config=prdp --estimates 8 --prompts 128
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rft import config as config_lib
from rft import placement
from rft.diffusion.sampling import SamplerConfig
from rft.objectives import prdp, step_baselines, trajectory
from rft.rewards import base as rewards_lib


def lambda_baselines_jnp(rewards, values, lam: float):
  """rft.objectives.step_baselines.lambda_baselines inside jit (same formula)."""
  if lam == 1.0:
    return values
  nxt = jnp.concatenate([values[:, 1:], rewards[:, None]], axis=1)
  delta = nxt - values

  def body(acc, d):
    acc = d + lam * acc
    return acc, acc

  _, adv = jax.lax.scan(body, jnp.zeros_like(rewards), delta.T, reverse=True)
  return rewards[:, None] - adv.T


def noise_scale(estimates: np.ndarray, n: int) -> dict:
  """|G|², tr(Σ) and B_simple from estimates [m, P] (m >= 2), each a mean over n samples.

  With m >= 3 also the jackknife standard error of |G|² and the B_simple range it gives
  (`b_low`, `b_high`; b_high is inf when |G|² is within one standard error of 0).
  """
  x = np.asarray(estimates, np.float64)
  m = x.shape[0]
  if m < 2:
    raise ValueError(f"noise_scale needs at least 2 estimates, got {m}")
  total = x.sum(0)
  sq = (x * x).sum(1)
  signal = float((total @ total - sq.sum()) / (m * (m - 1)))
  noise = float(sq.mean() - signal)  # tr(Σ) / n
  out = {"signal": signal, "trace_cov": n * noise, "b_simple": _b(n * noise, signal)}
  if m >= 3:
    loo_total = total[None] - x  # leave one estimate out
    loo = (np.einsum("kp,kp->k", loo_total, loo_total) - (sq.sum() - sq)) / ((m - 1) * (m - 2))
    se = float(np.sqrt((m - 1) / m * np.sum((loo - loo.mean()) ** 2)))
    out.update(signal_se=se, b_low=_b(n * noise, signal + se), b_high=_b(n * noise, signal - se))
  return out


def _b(trace_cov: float, signal: float) -> float:
  return trace_cov / signal if signal > 0 else float("inf")


def adam_like(estimates: np.ndarray) -> np.ndarray:
  """Every coordinate divided by its rms over the estimates (0 where all are 0)."""
  x = np.asarray(estimates, np.float64)
  rms = np.sqrt((x * x).mean(0))
  return np.where(rms > 0, x / np.where(rms > 0, rms, 1.0), 0.0)


def step_gradients(config, num_estimates: int, prompts: int, seed: int = 0,
                   workdir: str = "/tmp/rft_noise_scale") -> tuple[np.ndarray, int]:
  """Per-step PRDP gradients [m, T, P] of the trained params at the base model, and n.

  Estimate e samples `prompts` training prompts x config.samples_per_prompt images with
  the config's sampler (fresh noise), scores them with config.reward and takes
  d loss / d params of each transition separately (their sum is the full gradient).
  """
  from rft.train import diffusion_rl
  from rft.worlds import diffusion_worlds
  o = config.objective
  if o.name != "prdp":
    raise ValueError(f"noise_scale measures PRDP's gradient; config.objective.name={o.name!r}")
  if config.finetune.mode != "full":
    raise ValueError("noise_scale measures full finetuning (config.finetune.mode='full')")
  world = diffusion_worlds.build(config, workdir)
  pipe, params = world.pipe, world.base_params
  sampler = SamplerConfig(**dict(config.sampler))
  reward = rewards_lib.build(config.reward, options=config.get("reward_options"),
                             **world.reward_kwargs)
  if reward.host:
    raise ValueError(f"noise_scale needs a jitted reward, got {config.reward!r}")
  mask = jax.tree.leaves(diffusion_rl.trainable_mask(params, config.finetune.trainable))
  B = config.samples_per_prompt
  scorer = trajectory.StepScorer(pipe.model_fn, pipe.sampler(sampler),
                                 sampler.guidance_scale, reduce="mean")

  with_values = o.get("step_baseline", "none") != "none"
  share = B if config.get("share_initial_noise") else 1

  @jax.jit
  def rollout_and_cotangent(tokens, prompts_, key):
    traj, cond, null = pipe.sample(params, tokens, key, sampler, share_within=share,
                                   record_x0=with_values)
    r = reward(pipe.images(params, traj.sample), prompts_, reward.params)
    lp = traj.log_probs  # theta = base = reference
    values = None
    if with_values:  # x0_reward: the reward of each step's x0 prediction
      n, T = lp.shape
      x0 = traj.x0_preds.reshape((n * T,) + traj.x0_preds.shape[2:])
      rep = jax.tree.map(lambda a: jnp.repeat(a, T, axis=0), prompts_)
      values = reward(pipe.images(params, x0), rep, reward.params).reshape(n, T)
      values = lambda_baselines_jnp(r, values, o.get("baseline_lambda", 1.0))

    def loss(lp_):
      return prdp.rdp_loss(lp_, lp, lp, r, group_size=B, beta=o.beta, clip_eps=None,
                          reduce=o.reduce, drop_ties=o.drop_ties, step_baselines=values)[0]

    batch = {"latents": traj.latents, "timesteps": traj.timesteps,
             "prev_timesteps": traj.prev_timesteps, "cond": cond, "null_cond": null}
    return batch, jax.grad(loss)(lp), r, values

  @jax.jit
  def step_grad(batch, cot, j):
    _, vjp = jax.vjp(lambda p: scorer.step(p, batch, j), params)
    (g,) = vjp(jnp.take(cot, j, axis=1))
    return jnp.concatenate([x.ravel() for x, keep in zip(jax.tree.leaves(g), mask) if keep])

  # Rows split over every device (data parallel), params replicated.
  rows = NamedSharding(placement.make_mesh(), P(placement.DATA))
  put_rows = lambda tree: jax.device_put(tree, rows)
  params = jax.device_put(params, NamedSharding(rows.mesh, P()))
  out, corrs = [], []
  for e in range(num_estimates):
    t0 = time.time()
    ids = np.repeat(world.sample_prompt_ids(np.random.default_rng([seed, e]), prompts, "train"), B)
    batch, cot, r, values = rollout_and_cotangent(
        put_rows(world.tokens[ids]), put_rows(world.reward_prompts(ids)),
        jax.random.fold_in(jax.random.key(seed), e))
    out.append(np.stack([np.asarray(step_grad(batch, cot, j))
                         for j in range(sampler.num_steps)]))
    if values is not None:
      corrs.append(step_baselines.value_correlation(np.asarray(r), np.asarray(values)))
    print(f"estimate {e + 1}/{num_estimates}: {len(ids)} samples, reward "
          f"{float(jnp.mean(r)):.3f}, {time.time() - t0:.1f} s", flush=True)
  if corrs:
    print("correlation of the x0_reward baseline with the final reward, per step: "
          + ", ".join(f"{c:.2f}" for c in np.mean(corrs, 0)), flush=True)
  return np.stack(out), prompts * B


def report(per_step: np.ndarray, n: int, trained_steps: int) -> list[dict]:
  """B_simple (raw and Adam-like) for each step and for step ranges starting at 0."""
  T = per_step.shape[1]
  ranges = [(j, j + 1) for j in range(T)]
  ranges += [(0, k) for k in sorted({2, T // 2, trained_steps, T - 1, T}) if 1 < k <= T]
  rows = []
  for lo, hi in ranges:
    g = per_step[:, lo:hi].sum(1)
    raw, adam = noise_scale(g, n), noise_scale(adam_like(g), n)
    rows.append({"steps": f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo),
                 "trained": hi <= trained_steps, "raw": raw, "adam": adam,
                 "b_simple": raw["b_simple"], "b_simple_adam": adam["b_simple"]})
  return rows


def _fmt(r: dict) -> str:
  """'B [low, high]' (jackknife), e.g. '12,000 [8,000, 25,000]' or '> 40,000'."""
  f = lambda b: f"{b:,.0f}"
  if "b_low" not in r:
    return f(r["b_simple"]) if np.isfinite(r["b_simple"]) else "noise only"
  if not np.isfinite(r["b_high"]):
    return f"> {f(r['b_low'])}" if np.isfinite(r["b_low"]) else "noise only"
  return f"{f(r['b_simple'])} [{f(r['b_low'])}, {f(r['b_high'])}]"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="prdp", help="configs/<name>.py[:arg]")
  ap.add_argument("--estimates", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=128, help="prompts per estimate")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. --set share_initial_noise=true "
                       "--set objective.step_baseline=x0_reward (repeatable)")
  ap.add_argument("--cpu_devices", type=int, default=8,
                  help="split a CPU host into this many devices (rft.placement.split_cpu)")
  args = ap.parse_args(argv)
  placement.split_cpu(args.cpu_devices)
  name, _, arg = args.config.partition(":")
  config = config_lib.apply_overrides(config_lib.load(name, arg or None), args.set)
  per_step, n = step_gradients(config, args.estimates, args.prompts, args.seed)
  T = per_step.shape[1]
  trained = T - int(config.objective.skip_last_steps)
  print(f"\nB_simple (samples per update at which noise = signal) [range from the jackknife "
        f"standard error of |G|^2], {args.estimates} estimates of {n} samples; steps 0..{T - 1} "
        f"from high to low noise; the config trains 0-{trained - 1}")
  print(f"{'steps':>6} | {'raw gradient':>30} | {'Adam-like':>30}")
  for row in report(per_step, n, trained):
    print(f"{row['steps']:>6} | {_fmt(row['raw']):>30} | {_fmt(row['adam']):>30}")


if __name__ == "__main__":
  main()
