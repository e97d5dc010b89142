"""DRaFT (Clark et al., ICLR 2024) on ShapesWorld: reward gradients through the sampler.

COMMAND:
  python -m rft.main --config=configs/draft.py        # DRaFT-1
  python -m rft.main --config=configs/draft.py:lv     # DRaFT-LV

EXPECTED: DRaFT-1, 150 updates of 32 prompts, 16 min (shared CPU): alignment 48.0 ->
45.7 % (train), 36.3 -> 39.1 % (held-out); the last step alone cannot move where
objects go. DRaFT-LV (30 epochs): 48.4 % / 37.1 %. See the README's method table.
Variants: `smoke`; `lv` (DRaFT-LV: n re-noised copies of the last step); `full` (K = T,
backprop through the whole chain).

Stable Diffusion (needs the model files locally, see README "Real models"):
  sd14_hpsv2   SD 1.4 with DRaFT-1 on HPSv2 over the HPDv2 train prompts; 50 DDIM steps,
               eta 1 here (the rollout records nothing, any eta works), CFG 7.5, LoRA on
               the UNet attention projections; rank, lr and batch are our choices (rank
               32, lr 2e-4, 8 prompts per update), not the paper's.
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "lv", "full", "sd14_hpsv2"))
  c = common.base()
  c.objective = config_dict.ConfigDict({
      "name": "draft_lv" if "lv" in variants else "draft",
      "grad_steps": 1,  # DRaFT-K: gradients through the last K steps
      "num_renoise": 2,  # DRaFT-LV: re-noised copies of the final sample
  })
  common.reward_backprop(c, epochs=150)
  if "sd14_hpsv2" in variants:
    common.sd_world(c, prompt_set="hpdv2")
    c.reward, c.reward_options = "hpsv2", common.reward_files("hpsv2")
    c.sampler.guidance_scale = 7.5
    c.finetune.lora_rank, c.finetune.lora_alpha = 32, 32.0
    c.lr, c.epochs, c.prompts_per_epoch, c.prompts_per_update = 2e-4, 2000, 8, 8
  if "smoke" in variants:
    common.smoke(c)
  if "full" in variants:  # after smoke, which shortens the chain
    c.objective.grad_steps = c.sampler.num_steps
  return config_lib.lock(c)
