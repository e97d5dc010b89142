"""DRaFT (Clark et al., ICLR 2024) on ShapesWorld: reward gradients through the sampler.

COMMAND:
  python -m rft.main --config=configs/draft.py        # DRaFT-1
  python -m rft.main --config=configs/draft.py:lv     # DRaFT-LV

EXPECTED: DRaFT-1, 150 updates of 32 prompts, 16 min (shared CPU): alignment 48.0 ->
45.7 % (train), 36.3 -> 39.1 % (held-out); the last step alone cannot move where
objects go. DRaFT-LV (30 epochs): 48.4 % / 37.1 %. See the README's method table.
Variants: `smoke`; `lv` (DRaFT-LV: n re-noised copies of the last step); `full` (K = T,
backprop through the whole chain).
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.train import online_config


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "lv", "full"))
  c = online_config.base()
  c.objective = config_dict.ConfigDict({
      "name": "draft_lv" if "lv" in variants else "draft",
      "grad_steps": 1,  # DRaFT-K: gradients through the last K steps
      "num_renoise": 2,  # DRaFT-LV: re-noised copies of the final sample
  })
  online_config.reward_backprop(c, epochs=150)
  if "full" in variants:
    c.objective.grad_steps = c.sampler.num_steps
  if "smoke" in variants:
    online_config.smoke(c)
  return config_lib.lock(c)
