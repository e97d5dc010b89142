"""Speed of the ShapesWorld text-to-image denoiser on this machine (CPU by default).

Claim checked: the default ``TextToImage`` (~0.6-1.0 M params) trains at >= 2.5 jitted
steps/s (fwd + bwd + adam, eps-MSE) at batch 64 on 16x16 images on 2 CPU cores, and
reports denoiser forward calls/s at batch 128 (one CFG batch of 64 prompts).

    python benchmarks/unet_speed.py                      # default config only
    python benchmarks/unet_speed.py --variants all       # every variant below
    python benchmarks/unet_speed.py --variants default,wide --runs 5 --steps 5

Numbers are medians over ``--runs`` timed runs of ``--steps`` calls each, after a
warm-up (compile + one run). The machine is shared; expect +-20 % noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rft.models.t2i import TextToImage, make_encode_fn, make_eps_fn

# Variants tried when choosing the default (all keep cross-attention at 8x8 and 4x4).
VARIANTS = {
    "default": {},  # (32, 64, 64), lean skips, cross-attn at 8x8 + 4x4, self-attn 4x4
    "full_skips": dict(full_skips=True),  # guided-diffusion up path (+1 block/level)
    "narrow_full_skips": dict(full_skips=True, channels=(32, 48, 64)),
    "wide_low": dict(channels=(32, 64, 96)),
    "no_mid_attn": dict(mid_attn=False),
    "attn_16x16": dict(attn_levels=(0, 1, 2)),  # cross-attn at full res too
}


def count_params(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def _time(fn, steps: int, runs: int) -> tuple[float, float]:
  """Median calls/s of ``fn`` (which must block) over ``runs`` runs of ``steps`` calls.

  Returns (wall-clock calls/s, calls per process-CPU-second). On a shared machine the
  second is less sensitive to other processes; multiply it by the core count for an
  idealised "all cores to myself" rate.
  """
  fn()  # warm-up run after compilation
  rates, cpu_rates = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      fn()
    rates.append(steps / (time.perf_counter() - t0))
    cpu_rates.append(steps / (time.process_time() - c0))
  return statistics.median(rates), statistics.median(cpu_rates)


def _flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench(name: str, overrides: dict, *, res: int, batch: int, infer_batch: int,
          steps: int, runs: int) -> dict:
  model = TextToImage(**overrides)
  rng = np.random.default_rng(0)
  L = model.max_len
  tokens = rng.integers(1, model.vocab_size, size=(batch, L)).astype(np.int32)
  tokens[:, 6:] = 0  # realistic padding
  x0 = rng.standard_normal((batch, res, res, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x0[:2], t[:2], tokens[:2])["params"]
  n_params = count_params(params)

  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  eps_fn = make_eps_fn(model)
  encode = make_encode_fn(model)

  def loss_fn(p, x0, t, tokens, key):
    noise = jax.random.normal(key, x0.shape)
    a = (1.0 - t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    pred = eps_fn(p, x_t, t, encode(p, tokens))
    return jnp.mean((pred - noise) ** 2)

  @jax.jit
  def train_step(p, o, x0, t, tokens, key):
    loss, g = jax.value_and_grad(loss_fn)(p, x0, t, tokens, key)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  state = {"p": params, "o": opt_state, "key": jax.random.PRNGKey(1)}
  x0, t, tokens = map(jnp.asarray, (x0, t, tokens))

  def one_train():
    state["key"], k = jax.random.split(state["key"])
    state["p"], state["o"], loss = train_step(state["p"], state["o"], x0, t, tokens, k)
    loss.block_until_ready()

  train_gflop = _flops(train_step, state["p"], state["o"], x0, t, tokens,
                       state["key"]) / 1e9
  t0 = time.perf_counter()
  one_train()
  compile_train = time.perf_counter() - t0
  train_rate, train_cpu = _time(one_train, steps, runs)

  # Inference: one denoiser call on a CFG batch (cond + uncond), text pre-encoded.
  rep = -(-infer_batch // batch)
  xi = jnp.tile(x0, (rep, 1, 1, 1))[:infer_batch]
  ti = jnp.tile(t, rep)[:infer_batch]
  toks = jnp.tile(tokens, (rep, 1))[:infer_batch]
  toks = toks.at[infer_batch // 2:].set(0)  # second half: empty prompt
  cond = jax.jit(encode)(params, toks)
  fwd = jax.jit(eps_fn)
  fwd_fn = lambda: fwd(params, xi, ti, cond).block_until_ready()
  fwd_fn()
  fwd_rate, fwd_cpu = _time(fwd_fn, steps * 2, runs)
  return dict(name=name, params=n_params, train=train_rate, train_cpu=train_cpu,
              fwd=fwd_rate, fwd_cpu=fwd_cpu, gflop=train_gflop, compile_s=compile_train)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="default",
                  help=f"comma list of {sorted(VARIANTS)} or 'all'")
  ap.add_argument("--res", type=int, default=16)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--infer_batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--runs", type=int, default=3)
  args = ap.parse_args()
  names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
  for n in names:
    if n not in VARIANTS:
      raise SystemExit(f"unknown variant {n!r}; expected one of {sorted(VARIANTS)}")
  print(f"backend={jax.default_backend()} devices={jax.devices()} res={args.res} "
        f"train batch={args.batch} infer batch={args.infer_batch}")
  print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} cores")
  print(f"{'variant':<20}{'params':>10}{'GFLOP/step':>11}{'train/s':>9}"
        f"{'train/cpu-s':>12}{'fwd/s':>8}{'fwd/cpu-s':>10}{'compile s':>10}")
  for n in names:
    r = bench(n, VARIANTS[n], res=args.res, batch=args.batch,
              infer_batch=args.infer_batch, steps=args.steps, runs=args.runs)
    print(f"{r['name']:<20}{r['params']:>10,}{r['gflop']:>11.1f}{r['train']:>9.2f}"
          f"{r['train_cpu']:>12.2f}{r['fwd']:>8.2f}{r['fwd_cpu']:>10.2f}"
          f"{r['compile_s']:>10.1f}", flush=True)
  print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
