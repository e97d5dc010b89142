"""Flow-GRPO (Liu et al. 2025) on a rectified-flow ShapesWorld base (rft.objectives.flow_grpo).

COMMAND:
  python -m rft.main --config=configs/pretrain_flow_shapes.py --workdir=workdirs/pretrain_flow
  python -m rft.main --config=configs/flow_grpo.py --config.base_dir=workdirs/pretrain_flow

EXPECTED: not measured yet on a usable flow base (none is shipped; the 2,500-step one of
configs/pretrain_flow_shapes.py reaches 18 % alignment). Runs end to end in the tests
(`:smoke` on a smoke flow base). Without --config.base_dir it stops at once naming it.
Settings: 10 flow-SDE steps at noise level 0.7 (the paper's a), 32 prompts x 16 samples per
epoch, group-normalised advantages, PPO clip 1e-4, advantages clipped to 5, KL coefficient 0.04
(the paper's β, its closed-form step KL to the base), the whole DiT at Adam 1e-4.
Variants: `fast` (Flow-GRPO-Fast: no KL), `dance` (DanceGRPO: one x_T per group, 60 % of
the steps per update, no KL), `mix` (MixGRPO: only a window of 2 consecutive steps is
stochastic and trained, the rest follow the ODE; the window starts at step 0 and moves
one step every 3 epochs, back to 0 past the end; no KL), `smoke`.
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.train import online_config


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "dance", "fast", "mix"))
  c = online_config.base()
  c.base_dir = config_lib.required(
      "--config.base_dir=<a flow base folder, e.g. the workdir of configs/pretrain_flow_shapes.py>")
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
  if "smoke" in variants:
    online_config.smoke(c)
  return config_lib.lock(c)
