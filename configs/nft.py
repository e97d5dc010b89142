"""DiffusionNFT (Zheng et al. 2025) on a rectified-flow ShapesWorld base (rft.objectives.nft).

COMMAND:
  python -m rft.main --config=configs/nft.py

The default is the DiffusionNFT row of `python -m rft.repro flow_methods` (README "Flow
method table"): from the shipped rectified-flow base (rft/assets/flow; --config.base_dir
for another one) on 32 fixed training captions, 20 epochs x 512 samples (10,240 reward
queries), judged by the independent evaluator on those captions (8 samples each) and on
256 held-out captions, sampled for evaluation with the Euler ODE, on 8 XLA CPU devices.
EXPECTED (3 seeds, 95 % t interval): seen-caption alignment 38.8 -> 50.0 %, gain +11.2
[8.2, 14.2] points; held-out +5.7 [1.8, 9.7]; +5 seen points reached within 5,120
queries on every seed; 9.9-10.1 min per run on one 2-core CPU.
Settings (the reference code's where they carry over): samples from the lagged policy
with the deterministic Euler ODE, 10 steps, no CFG; 32 prompts x 16 samples per epoch,
group means with the batch's std (global_std), advantages clipped to 5, beta 1, KL
coefficient 1e-4 to the base, 90 % of the 10 noise levels per image, sampling-policy
decay (flat 0, rate 0.001, cap 0.5); two updates per epoch; the whole DiT at Adam 1e-4
(the reference trains LoRA at 3e-4).

`sd35_pickscore`: the reference's PickScore setting on Stable Diffusion 3.5 Medium (a
diffusers folder or a cached hub id in --config.model_path; download it first): 512 px,
48 prompts x 8 images per epoch (Pick-a-Pic prompts, --config.prompt_set=pickapic:<path>),
one update per epoch, 10 deterministic sampling steps without CFG (the reference's
second-order DPM solver; here the Euler ODE), evaluation with 40 steps, beta 1, KL
coefficient 1e-4, the same decay of the sampling policy, LoRA rank 32 / alpha 64 on the
MMDiT's attention at Adam 3e-4. Not run here (no weights, no accelerator).
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "sd35_pickscore"))
  c = common.base()
  # The shipped rectified-flow base (configs/pretrain_flow_shapes.py, 5,000 steps;
  # README "Flow base"); any other flow base folder with --config.base_dir.
  c.base_dir = "assets/flow"
  c.sampler.name = "flow"
  c.sampler.eta = 0.0  # the Euler ODE: any solver works, no log-probs are needed
  c.sampler.guidance_scale = 1.0  # CFG-free
  c.objective = config_dict.ConfigDict({
      "name": "nft",
      "beta": 1.0,  # mixing of the implicit positive / negative policies
      "adv_clip_max": 5.0,
      "global_std": True,  # divide by the whole batch's reward std (the reference's default)
      "kl_coef": 1e-4,  # mean squared velocity difference to the base
      "timestep_fraction": 0.9,  # of the sampler's noise levels, per image
      "old_decay": (0.0, 0.001, 0.5),  # sampling policy: d = min(max(0, s - flat) * rate, cap)
  })
  c.epochs = 20
  c.prompts_per_epoch = 32
  c.samples_per_prompt = 16
  c.updates_per_epoch = 2
  c.prompts_per_update = 16
  c.lr = 1e-4
  c.train_prompts = 32  # T1's fixed training captions
  c.eval_prompts = 256
  c.eval_batch_size = 256
  c.eval_every = 5
  c.ckpt_every = 5
  c.eval_sampler.eta = 0.0  # judged with the Euler ODE, as every row of the flow table
  c.cpu_devices = 8  # XLA CPU devices on a CPU host (ignored on GPU / TPU)
  if "sd35_pickscore" in variants:
    c.train_prompts = 0
    c.cpu_devices = 0
    common.sd35m_pickscore(c)
    c.sampler.eta = 0.0
    c.sampler.guidance_scale = 1.0  # sd3_world sets Flow-GRPO's 4.5; NFT is CFG-free
    c.eval_sampler.num_steps = 40
    c.prompts_per_epoch = 48
    c.samples_per_prompt = 8
    c.updates_per_epoch = 1
    c.prompts_per_update = 48
    c.lr = 3e-4
  if "smoke" in variants:
    common.smoke(c)
  return config_lib.lock(c)
