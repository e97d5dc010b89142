"""W1 / W1g: CFG DDIM rollout with per-step log-probs, rft (jit, lax.scan) vs diffusers' UNet.

Workload W1 of ../shared/BENCHMARKS.md: a random diffusers ``UNet2DConditionModel``
(sample_size 32, 4 channels, layers_per_block 1, block_out_channels (32, 64),
CrossAttnDownBlock2D + DownBlock2D / UpBlock2D + CrossAttnUpBlock2D, cross-attention dim
64, 8 heads, 8 groups; about 0.8 M params), loaded into rft with the same weights
(``rft.weights.sd_unet.unet_from_diffusers``). Batch 8, latents 32x32x4, text states
8 x 8 tokens x 64, CFG 5 (uncond + cond in one UNet call of batch 16), 50 DDIM steps,
eta 1, scaled-linear betas 0.00085-0.012 over 1000 steps, the Gaussian log-prob of every
transition recorded. W1g: the same loop at Stable Diffusion 1.5 size (block_out_channels
320/640/1280/1280, cross-attention 768, latents 64x64x4, 77 text tokens) in bf16 on a GPU.

The alternative is what a PyTorch user writes: the same loop over diffusers' UNet and
``DDIMScheduler.step`` (eta 1), with the log-prob of each sampled transition computed
from the step's mean and standard deviation (as DDPO's ``ddim_step_with_logprob``), under
``torch.no_grad()`` (and ``torch.autocast`` in bf16 for W1g).

  python benchmarks/sd_rollout.py                 # W1 (CPU, 2 threads)
  python benchmarks/sd_rollout.py --preset w1g    # W1g (GPU)

Prints each side's median seconds per rollout and images/s over --reps runs (after a
warm-up run that also compiles ours), then the ratio.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp

PRESETS = {
    "w1": dict(sample=32, blocks=(32, 64), down=("CrossAttnDownBlock2D", "DownBlock2D"),
               up=("UpBlock2D", "CrossAttnUpBlock2D"), layers=1, cross=64, heads=8, groups=8,
               batch=8, tokens=8, steps=50, cfg=5.0, dtype="float32"),
    "w1g": dict(sample=64, blocks=(320, 640, 1280, 1280),
                down=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers=2, cross=768, heads=8,
                groups=32, batch=8, tokens=77, steps=50, cfg=5.0, dtype="bfloat16"),
}


def build_unet(p):
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  return UNet2DConditionModel(
      sample_size=p["sample"], in_channels=4, out_channels=4, layers_per_block=p["layers"],
      block_out_channels=p["blocks"], down_block_types=p["down"], up_block_types=p["up"],
      cross_attention_dim=p["cross"], attention_head_dim=p["heads"],
      norm_num_groups=p["groups"]).eval()


def torch_rollout_fn(unet, p, device):
  """The PyTorch loop: diffusers UNet + DDIMScheduler.step + per-step Gaussian log-prob."""
  import torch
  from diffusers import DDIMScheduler
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  sched.set_timesteps(p["steps"])
  bf16 = p["dtype"] == "bfloat16"
  unet = unet.to(device)
  ac = sched.alphas_cumprod.to(device)
  step_ratio = sched.config.num_train_timesteps // p["steps"]
  b, s = p["batch"], p["sample"]

  def run(seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((b, 4, s, s), generator=g, device=device)
    cond = torch.randn((b, p["tokens"], p["cross"]), generator=g, device=device)
    null = torch.zeros((1, p["tokens"], p["cross"]), device=device).expand(b, -1, -1)
    text = torch.cat([null, cond])
    log_probs = []
    with torch.no_grad(), torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
      for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.float().chunk(2)
        eps = eps_u + p["cfg"] * (eps_c - eps_u)
        noise = torch.randn(x.shape, generator=g, device=device)
        prev = sched.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        prev_t = int(t) - step_ratio
        ab_t = ac[int(t)]
        ab_prev = ac[prev_t] if prev_t >= 0 else ac[0]
        std = torch.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        mean = prev - std * noise
        lp = (-((prev - mean) ** 2) / (2 * std ** 2) - torch.log(std)
              - math.log(math.sqrt(2 * math.pi)))
        log_probs.append(lp.mean(dim=(1, 2, 3)))
        x = prev
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    return x, torch.stack(log_probs, 1)

  return run


def rft_rollout_fn(unet_torch, p):
  from rft.diffusion import ddim, sampling
  from rft.diffusion.schedules import make_schedule
  from rft.models.sd_unet import UNet2DCondition, UNetConfig
  from rft.weights.sd_unet import unet_from_diffusers
  cfg = UNetConfig.from_diffusers(dict(unet_torch.config))
  state = {k: v.detach().float().cpu().numpy() for k, v in unet_torch.state_dict().items()}
  params = unet_from_diffusers(state, cfg, source="benchmark")
  dtype = jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
  model = UNet2DCondition(cfg, dtype=dtype)
  schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  b, s = p["batch"], p["sample"]

  def eps_fn(params, x, t, cond):
    return model.apply({"params": params}, x, t, cond)

  @jax.jit
  def rollout(params, key):
    k_x, k_c, k_steps = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (b, s, s, 4), jnp.float32)
    cond = jax.random.normal(k_c, (b, p["tokens"], p["cross"]), jnp.float32)
    null = jnp.zeros((1, p["tokens"], p["cross"]), jnp.float32)
    traj = sampling.rollout(eps_fn, params, ddim.DDIMSampler(schedule, eta=1.0), x, cond, null,
                            num_steps=p["steps"], guidance_scale=p["cfg"], key=k_steps)
    return traj.sample, traj.log_probs

  def run(seed):
    out = rollout(params, jax.random.key(seed))
    jax.block_until_ready(out)
    return out

  return run


def time_runs(fn, reps):
  fn(0)  # warm-up (compiles ours)
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    fn(r + 1)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="w1", choices=sorted(PRESETS))
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (W1: 2)")
  args = ap.parse_args()
  p = PRESETS[args.preset]
  import torch
  torch.set_num_threads(args.threads)
  device = "cuda" if torch.cuda.is_available() and args.preset == "w1g" else "cpu"
  unet = build_unet(p)
  n_params = sum(v.numel() for v in unet.parameters())
  print(f"preset {args.preset}: UNet {n_params / 1e6:.2f} M params, batch {p['batch']}, "
        f"{p['steps']} steps, CFG {p['cfg']}, {p['dtype']}; jax {jax.default_backend()}, "
        f"torch {device}")
  ours = rft_rollout_fn(unet, p)
  theirs = torch_rollout_fn(unet, p, device)
  t_ours, all_ours = time_runs(ours, args.reps)
  t_theirs, all_theirs = time_runs(theirs, args.reps)
  ips = lambda t: p["batch"] / t
  print(f"rft (jit, lax.scan)   {t_ours:8.3f} s/rollout  {ips(t_ours):7.3f} images/s  "
        f"runs {[round(t, 3) for t in all_ours]}")
  print(f"diffusers (torch)     {t_theirs:8.3f} s/rollout  {ips(t_theirs):7.3f} images/s  "
        f"runs {[round(t, 3) for t in all_theirs]}")
  print(f"ratio rft / diffusers: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
  main()
