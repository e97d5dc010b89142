"""DDPO (Black et al., ICLR 2024) on ShapesWorld: PPO-clip surrogate over denoising steps.

COMMAND:
  python -m rft.main --config=configs/ddpo.py

EXPECTED: 30 epochs x 256 samples, 7,680 reward queries, about 12 min alone (18.5 min
measured sharing the CPU): alignment 48.0 -> 49.2 % (train), 36.3 -> 36.7 % (held-out),
within noise of the base model. See the README's method table.
Variants: `smoke` (seconds); `sf` (score-function DDPO_SF instead of importance sampling);
`compressibility` (JPEG compressibility reward, as in the paper).

Stable Diffusion (needs the model files locally, see README "Real models"):
  sd14_aesthetic        SD 1.4, 45 animals, LAION aesthetic predictor
  sd14_compressibility  SD 1.4, 45 animals, JPEG compressibility
  sd14_hpsv2 / sd14_pickscore / hpdv2_hpsv2   DDPO on PRDP's Table 1 / 2 settings (the
                        DDPO rows of `python -m rft.repro prdp_table1 --preset sd`)
DDPO's settings: 50 DDIM steps, eta 1, CFG 5, 256 samples per epoch (32 prompts x 8),
two gradient steps of 128 samples each, clip 1e-4, advantages clipped at 5, per-prompt
statistics (buffer 16, min count 16), LoRA rank 4 at lr 3e-4.
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


PRDP_SETTINGS = ("sd14_hpsv2", "sd14_pickscore", "hpdv2_hpsv2")


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "sf", "compressibility", "sd14_aesthetic",
                                       "sd14_compressibility") + PRDP_SETTINGS)
  c = common.base()
  c.objective = config_dict.ConfigDict({
      "name": "ddpo",
      "importance_sampling": "sf" not in variants,  # DDPO_IS (PPO clip) vs DDPO_SF
      "clip_range": 1e-4,  # paper / reference code
      "adv_clip_max": 5.0,
      "timestep_fraction": 1.0,
      # Per-step baseline (rft.objectives.step_baselines): "none" or "x0_reward" (the reward
      # of the sampler's x0 prediction at each step; same expected gradient, less noise).
      "step_baseline": "none",
      # GAE lambda over the step baselines: 1 = unbiased (r - b_t); 0 = b_{t+1} - b_t.
      "baseline_lambda": 1.0,
      # Final steps left out of the gradient (see rft.objectives.trajectory.select_steps).
      "skip_last_steps": 2,
      "per_prompt_stats": True,  # per-prompt reward mean/std (fallback: batch stats)
      "buffer_size": 16,
      "min_count": 8,
  })
  c.epochs = 30
  c.prompts_per_epoch = 32
  c.samples_per_prompt = 8
  c.updates_per_epoch = 2  # one pass over the epoch's samples in 2 minibatches
  c.prompts_per_update = 16
  c.lr = 2e-5
  c.eval_every = 15
  c.ckpt_every = 5
  if "compressibility" in variants:
    c.reward = "jpeg_compressibility"
  if variants & {"sd14_aesthetic", "sd14_compressibility", *PRDP_SETTINGS}:
    common.sd_world(c, prompt_set="hpdv2" if "hpdv2_hpsv2" in variants else "animals45")
    c.epochs, c.lr, c.objective.skip_last_steps = 100, 3e-4, 0
    c.prompts_per_epoch, c.samples_per_prompt = 32, 8
    c.updates_per_epoch, c.prompts_per_update = 2, 16
    c.objective.min_count = 16
    if "sd14_aesthetic" in variants:
      c.reward, c.reward_options = "aesthetic", common.reward_files("aesthetic")
    elif "sd14_compressibility" in variants:
      c.reward = "jpeg_compressibility"
    else:  # PRDP's Table 1 / 2 rewards
      name = "pickscore" if "sd14_pickscore" in variants else "hpsv2"
      c.reward, c.reward_options = name, common.reward_files(name)
  if "smoke" in variants:
    common.smoke(c)
    c.objective.min_count = 2
  return config_lib.lock(c)
