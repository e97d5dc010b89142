"""RAFT (Dong et al., TMLR 2023) on ShapesWorld: finetune on the best-of-k samples.

COMMAND:
  python -m rft.main --config=configs/raft.py

EXPECTED: at lr 1e-4 the model degrades: after 30 epochs (15,360 samples) alignment
48.0 -> 41.4 % (train), 36.3 -> 30.5 % (held-out). See the README's method table.
Each epoch samples `samples_per_prompt` images for each of `prompts_per_epoch` prompts,
keeps the top `keep` per prompt by reward, and runs `updates_per_epoch` eps-loss steps
on minibatches of the kept images. Variants: `smoke`.
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke",))
  c = common.base()
  c.objective = config_dict.ConfigDict({"name": "raft", "keep": 1, "cond_dropout": 0.1})
  c.epochs = 40
  c.prompts_per_epoch = 64
  c.samples_per_prompt = 8
  c.updates_per_epoch = 4
  c.prompts_per_update = 16
  c.lr = 1e-4
  if "smoke" in variants:
    common.smoke(c)
  return config_lib.lock(c)
