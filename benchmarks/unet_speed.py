"""Speed of the ShapesWorld text-to-image denoiser on this machine (CPU by default).

Claim checked: the default ``TextToImage`` (~1 M params) does about 2.5 jitted train
steps/s (fwd + bwd + adam, eps-MSE) at batch 64 on 16x16 images on 2 CPU cores, the
budget DESIGN.md plans pretraining with, and how many denoiser forward calls/s it does
at batch 128 (one CFG batch of 64 prompts: the sampler's inner call; text encoded once
outside). Its variants show why the default looks the way it does.

Usage:

    python benchmarks/unet_speed.py                      # default config only
    python benchmarks/unet_speed.py --variants all       # every variant in VARIANTS
    python benchmarks/unet_speed.py --variants default,full_skips --rounds 5

All variants are compiled first, then timed round-robin (``--rounds`` rounds, each
timing ``--steps`` train steps and ``2 * --steps`` forward calls per variant), and the
median over rounds is reported, so load from other processes on a shared machine hits
every variant alike. Columns:

  GFLOP/step   XLA's cost analysis of the jitted train step (load-independent)
  train/s      wall-clock train steps per second
  train/cpu-s  train steps per process-CPU-second (close to train/s means the run got
               about one core's worth of CPU: the machine was contended)
  fwd/s        wall-clock denoiser calls per second at --infer_batch
  compile s    time to lower + compile the train step

Measured with ``--variants all --rounds 3`` on the 2-core shared CPU while other jobs
kept the load average at ~3.5 (so absolute rates are pessimistic):

  variant                  params GFLOP/step  train/s train/cpu-s   fwd/s compile s
  default               1,056,707       14.5     2.35        2.38    5.14      17.4
  full_skips            1,395,875       20.4     1.58        1.59    3.44      23.9
  narrow_full_skips     1,207,363       17.0     1.47        1.48    4.03      24.8
  wide_low              1,617,539       17.3     1.88        1.89    3.97      23.1
  no_mid_attn           1,023,555       14.3     2.21        2.22    5.03      19.8
  attn_16x16            1,069,187       15.2     1.68        1.69    4.25      22.3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rft.models.t2i import TextToImage, make_encode_fn, make_eps_fn  # noqa: E402

# Variants tried when choosing the default (all keep cross-attention at 8x8 and 4x4).
VARIANTS = {
    "default": {},  # (32, 64, 64), lean skips, cross-attn 8x8 + 4x4, self-attn 4x4 + mid
    "full_skips": dict(full_skips=True),  # guided-diffusion up path (+1 block/level)
    "narrow_full_skips": dict(full_skips=True, channels=(32, 48, 64)),
    "wide_low": dict(channels=(32, 64, 96)),
    "no_mid_attn": dict(mid_attn=False),
    "attn_16x16": dict(attn_levels=(0, 1, 2)),  # cross-attn at full res too
}


def count_params(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def _timed(fn, n: int) -> tuple[float, float]:
  """(calls per wall second, calls per process-CPU second) over n blocking calls."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(n):
    fn()
  return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def prepare(name: str, overrides: dict, *, res: int, batch: int,
            infer_batch: int) -> dict:
  """Builds, compiles and warms up one variant; returns its blocking callables."""
  model = TextToImage(**overrides)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, model.vocab_size, size=(batch, model.max_len)).astype(np.int32)
  tokens[:, 6:] = model.pad_id  # realistic padding
  x0 = rng.standard_normal((batch, res, res, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x0[:2], t[:2], tokens[:2])["params"]

  tx = optax.adam(1e-3)
  eps_fn = make_eps_fn(model)
  encode = make_encode_fn(model)

  def loss_fn(p, x0, t, tokens, key):
    noise = jax.random.normal(key, x0.shape)
    a = (1.0 - t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    pred = eps_fn(p, x_t, t, encode(p, tokens))
    return jnp.mean((pred - noise) ** 2)

  def train_step(p, o, x0, t, tokens, key):
    loss, g = jax.value_and_grad(loss_fn)(p, x0, t, tokens, key)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  x0, t, tokens = map(jnp.asarray, (x0, t, tokens))
  state = {"p": params, "o": tx.init(params), "key": jax.random.PRNGKey(1)}
  t0 = time.perf_counter()
  compiled = jax.jit(train_step).lower(state["p"], state["o"], x0, t, tokens,
                                       state["key"]).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  gflop = float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan")

  def one_train():
    state["key"], k = jax.random.split(state["key"])
    state["p"], state["o"], loss = compiled(state["p"], state["o"], x0, t, tokens, k)
    loss.block_until_ready()

  # Inference: one denoiser call on a CFG batch (cond + uncond), text pre-encoded.
  rep = -(-infer_batch // batch)
  xi = jnp.tile(x0, (rep, 1, 1, 1))[:infer_batch]
  ti = jnp.tile(t, rep)[:infer_batch]
  toks = jnp.tile(tokens, (rep, 1))[:infer_batch]
  toks = toks.at[infer_batch // 2:].set(model.pad_id)  # second half: empty prompt
  cond = jax.jit(encode)(params, toks)
  fwd = jax.jit(eps_fn)
  one_fwd = lambda: fwd(params, xi, ti, cond).block_until_ready()
  one_train(), one_train(), one_fwd(), one_fwd()  # warm-up
  return dict(name=name, params=count_params(params), gflop=gflop,
              compile_s=compile_s, train_fn=one_train, fwd_fn=one_fwd)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="default",
                  help=f"comma list of {sorted(VARIANTS)} or 'all'")
  ap.add_argument("--res", type=int, default=16)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--infer_batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
  for n in names:
    if n not in VARIANTS:
      raise SystemExit(f"unknown variant {n!r}; expected one of {sorted(VARIANTS)}")
  print(f"backend={jax.default_backend()} res={args.res} train batch={args.batch} "
        f"infer batch={args.infer_batch} cores={os.cpu_count()} "
        f"loadavg={os.getloadavg()[0]:.2f}", flush=True)
  runs = [prepare(n, VARIANTS[n], res=args.res, batch=args.batch,
                  infer_batch=args.infer_batch) for n in names]
  for r in runs:
    r["train"], r["train_cpu"], r["fwd"] = [], [], []
  for _ in range(args.rounds):
    for r in runs:
      wall, cpu = _timed(r["train_fn"], args.steps)
      r["train"].append(wall)
      r["train_cpu"].append(cpu)
      r["fwd"].append(_timed(r["fwd_fn"], 2 * args.steps)[0])
  med = statistics.median
  print(f"{'variant':<20}{'params':>11}{'GFLOP/step':>11}{'train/s':>9}"
        f"{'train/cpu-s':>12}{'fwd/s':>8}{'compile s':>10}")
  for r in runs:
    print(f"{r['name']:<20}{r['params']:>11,}{r['gflop']:>11.1f}{med(r['train']):>9.2f}"
          f"{med(r['train_cpu']):>12.2f}{med(r['fwd']):>8.2f}{r['compile_s']:>10.1f}")
  print(f"loadavg at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
