"""PRDP epoch throughput on ShapesWorld: samples per second including the update.

Runs `python -m rft.main --config=configs/prdp.py:all_captions` for a few epochs (no evaluation, no
checkpoint but the last) once per setting, one after the other in this one command,
and reads each epoch's wall time from results.json's curve. The first epoch (compile)
is left out; the figure is the median of the rest. Every setting samples the same 512
images per epoch (64 prompts x 8), so samples/s compare directly.

Settings:
  before      configs/prdp.py:all_captions (the generic PRDP settings): 1 XLA CPU device,
              the whole UNet trained, final 4 of 10 steps out of the gradient, no step
              baselines
  devices     the same on 8 XLA CPU devices (config.cpu_devices = 8; rft.placement.split_cpu)
  lowres      8 devices, only the low-resolution UNet blocks trained (the backward pass
              stops at the first frozen layer; `rft.repro`'s T1 cpu preset trains these)
  after       lowres plus the variance levers of the paper-table presets: shared initial
              noise per group and x0_reward step baselines (one reward-model pass on the
              sampler's x0 prediction at every step)
  shared_ref  after, with the base model's log-probs of the sampled transitions scored
              inside the rollout's loop (config.ref_in_rollout): the frozen input layers
              policy and base share run once per step (as far as XLA's CSE merges
              them), and no second scan over the stored latents. The main job
              (configs/prdp.py) runs `after` on 32 fixed captions x 16 samples: the
              base's log-probs in a separate scan (config.ref_in_rollout=False).

  python benchmarks/prdp_epoch.py [--epochs 5] [--settings before,devices,lowres,after,shared_ref]

Prints samples/s per setting and the ratio to `before`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"prompts_per_epoch": 64, "samples_per_prompt": 8, "prompts_per_update": 64,
         "updates_per_epoch": 1, "train_prompts": 0, "ref_in_rollout": False}
_DEV = dict(SHAPE, cpu_devices=8)
_LOWRES = dict(_DEV, **{"finetune.trainable": r"^unet/(mid|down2|up2)"})
SETTINGS = {
    "before": dict(SHAPE),
    "devices": _DEV,
    "lowres": _LOWRES,
    "after": dict(_LOWRES, share_initial_noise=True,
                  **{"objective.step_baseline": "x0_reward"}),
}
SETTINGS["shared_ref"] = dict(SETTINGS["after"], ref_in_rollout=True)


def epoch_seconds(overrides: dict, epochs: int, workdir: str) -> list[float]:
  flags = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}"
           for k, v in overrides.items()]
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the settings choose the device count
  cmd = [sys.executable, "-m", "rft.main", "--config=configs/prdp.py:all_captions",
         f"--workdir={workdir}",
         f"--config.epochs={epochs}", "--config.eval_every=0", f"--config.ckpt_every={epochs}",
         *flags]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    curve = json.load(f)["curve"]
  return [curve[str(e)]["epoch_seconds"] for e in range(1, epochs + 1)]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--epochs", type=int, default=5)
  ap.add_argument("--settings", default="before,devices,lowres,after,shared_ref")
  args = ap.parse_args(argv)
  names = args.settings.split(",")
  samples = SHAPE["prompts_per_epoch"] * SHAPE["samples_per_prompt"]
  rate = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      secs = epoch_seconds(SETTINGS[name], args.epochs, os.path.join(tmp, name))
      steady = float(np.median(secs[1:]))
      rate[name] = samples / steady
      print(f"{name:>8}: epoch seconds {[round(s, 1) for s in secs]} -> median {steady:.1f} s "
            f"(first epoch compiles), {rate[name]:.1f} samples/s", flush=True)
  if "before" in rate:
    for name in names:
      print(f"{name:>8}: {rate[name] / rate['before']:.2f}x the samples/s of 'before'")
  if "after" in rate and "shared_ref" in rate:
    print(f"shared_ref: {rate['shared_ref'] / rate['after']:.2f}x the samples/s of 'after'")


if __name__ == "__main__":
  main()
