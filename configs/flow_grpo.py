"""Flow-GRPO (Liu et al. 2025) on a rectified-flow ShapesWorld base (rft.objectives.flow_grpo).

COMMAND:
  python -m rft.main --config=configs/flow_grpo.py

It starts from the shipped rectified-flow base (rft/assets/flow; --config.base_dir=<folder>
for another one). Runs end to end in the tests (`:smoke` on a smoke flow base).
EXPECTED: these defaults (the paper's choices at ShapesWorld scale) are measured only as
a single-seed probe: an epoch ~65 s on a 2-core CPU, seen-caption alignment 39.1 -> 40.2 %
in 10 epochs on 32 captions. The Flow-GRPO row of `python -m rft.repro flow_methods`
(this config with T1's variance levers, the last 4 steps out of the gradient and the
DiT's last two blocks at lr 3e-4; 32 captions, 20 epochs, judged with the Euler ODE):
an epoch 15-16.5 s, seen alignment +2.0 [-6.8, 10.7] points over 3 seeds (inside the noise),
5.8-6.1 min per run; DiffusionNFT gains more on the same seeds (+9.2 [2.1, 16.4]).
Settings: 10 flow-SDE steps at noise level 0.7 (the paper's a), 32 prompts x 16 samples per
epoch, group-normalised advantages, PPO clip 1e-4, advantages clipped to 5, KL coefficient 0.04
(the paper's β, its closed-form step KL to the base), the whole DiT at Adam 1e-4.
Variants: `fast` (Flow-GRPO-Fast: no KL), `dance` (DanceGRPO: one x_T per group, 60 % of
the steps per update, no KL), `mix` (MixGRPO: only a window of 2 consecutive steps is
stochastic and trained, the rest follow the ODE; the window starts at step 0 and moves
one step every 3 epochs, back to 0 past the end; no KL), `smoke`.

`sd35_pickscore`: the paper's PickScore setting on Stable Diffusion 3.5 Medium (a
diffusers folder or a cached hub id in --config.model_path; download it first): 512 px,
10 SDE steps at noise level 0.7, CFG 4.5, 48 prompts x 24 images per epoch (Pick-a-Pic
prompts, --config.prompt_set=pickapic:<path>), two updates per epoch, 9 of the 10 steps
per update, KL coefficient 0.01, advantages over the prompt's images divided by the
batch std, LoRA rank 32 / alpha 64 on the MMDiT's attention at Adam 3e-4, EMA for
evaluation. Not run here (no weights, no accelerator).
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "dance", "fast", "mix",
                                                  "sd35_pickscore"))
  c = common.base()
  # The shipped rectified-flow base (configs/pretrain_flow_shapes.py, 5,000 steps;
  # README "Flow base"); any other flow base folder with --config.base_dir.
  c.base_dir = "assets/flow"
  c.sampler.name = "flow"
  c.sampler.eta = 0.7
  c.objective = config_dict.ConfigDict({
      "name": "flow_grpo",
      "clip_range": 1e-4,
      "adv_clip_max": 5.0,
      "global_std": False,  # divide by the whole batch's reward std instead of the group's
      "kl_coef": 0.04,  # β of the step KL to the base (0: Flow-GRPO-Fast, DanceGRPO)
      "timestep_fraction": 1.0,
      "skip_last_steps": 0,
      "step_baseline": "none",
      "baseline_lambda": 1.0,
  })
  c.epochs = 30
  c.prompts_per_epoch = 32
  c.samples_per_prompt = 16
  c.updates_per_epoch = 1
  c.prompts_per_update = 32
  c.lr = 1e-4
  c.eval_every = 10
  c.ckpt_every = 5
  if "fast" in variants:
    c.objective.kl_coef = 0.0
  if "dance" in variants:
    c.objective.kl_coef = 0.0
    c.share_initial_noise = True
    c.objective.timestep_fraction = 0.6
  if "mix" in variants:
    c.objective.kl_coef = 0.0
    c.sde_window.size = 2
    c.sde_window.stride = 1
    c.sde_window.every = 3
  if "sd35_pickscore" in variants:
    common.sd35m_pickscore(c)
    c.sampler.eta = 0.7
    c.objective.kl_coef = 0.01
    c.objective.global_std = True
    c.objective.timestep_fraction = 0.9  # the reference trains int(0.99 * 10) = 9 steps
    c.prompts_per_epoch = 48
    c.samples_per_prompt = 24
    c.updates_per_epoch = 2
    c.prompts_per_update = 24
    c.lr = 3e-4
    c.ema_decay = 0.9
  if "smoke" in variants:
    common.smoke(c)
  return config_lib.lock(c)
