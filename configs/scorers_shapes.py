"""Train the ShapesWorld alignment scorers: a reward model and an independent evaluator.

COMMAND:
  python -m rft.main --config=configs/scorers_shapes.py --workdir=workdirs/scorers_shapes
  (add --config.export_dir=rft/assets to refresh the bundles shipped in the repo)

EXPECTED: about 10 + 8 minutes on a 2-core CPU. On 4,096 fresh renders of held-out
captions the reward scorer reaches 99.4 % scene accuracy and the evaluator 100.0 %
(alignment of renders with their own caption: the same figures).
"""
from ml_collections import config_dict

from rft import config as config_lib

def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke",))
  c = config_dict.ConfigDict()
  c.trainer = "train_scorers"
  c.mesh = config_dict.ConfigDict({"data": -1})
  c.holdout_fraction = 0.2
  c.split_seed = 0
  c.reward = config_dict.ConfigDict({"arch": "cell_cnn", "seed": 1})
  c.evaluator = config_dict.ConfigDict({"arch": "crop_cnn", "seed": 2})
  c.steps = 2000
  c.batch_size = 128
  c.lr = 2e-3
  c.warmup = 100
  c.weight_decay = 1e-4
  c.aug_noise = 0.2
  c.log_every = 100
  c.ckpt_every = 1000
  c.eval_images = 4096
  c.export_dir = ""
  if "smoke" in variants:
    c.steps = 20
    c.batch_size = 32
    c.log_every = 10
    c.ckpt_every = 10
    c.eval_images = 64
  return config_lib.lock(c)
