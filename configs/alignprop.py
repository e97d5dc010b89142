"""AlignProp (Prabhudesai et al. 2023) on ShapesWorld: reward backprop with random truncation.

COMMAND:
  python -m rft.main --config=configs/alignprop.py

EXPECTED: at lr 1e-4 (full finetuning) the model degrades: after 60 updates alignment
48.0 -> 39.8 % (train), 36.3 -> 30.9 % (held-out). See the README's method table.
Each update draws K ~ U{min_grad_steps..T} and backpropagates through the last K steps
(one checkpointed step at a time). Variants: `smoke`; `lora` (LoRA rank 4, as in the paper).
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke", "lora"))
  c = common.base()
  c.objective = config_dict.ConfigDict({"name": "alignprop", "min_grad_steps": 1})
  common.reward_backprop(c, epochs=100)
  if "lora" in variants:
    c.finetune.mode = "lora"
    c.lr = 1e-3
  if "smoke" in variants:
    common.smoke(c)
  return config_lib.lock(c)
