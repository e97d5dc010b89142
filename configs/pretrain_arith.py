"""Pretrain the arithmetic-world LM (character tokenizer, Llama-style decoder).

COMMAND:
  python -m rft.main --config=configs/pretrain_arith.py --workdir=workdirs/pretrain_arith
  (add --config.export_dir=rft/assets to refresh the base LM shipped in the repo)

EXPECTED: 1,500 steps at batch 256, 9.1 min on a 2-core CPU (shared): exact match on
held-out problems 82.0 % greedy, 43.0 % sampled at T = 1 (train 81.8 / 46.7 %). The
corpus is noisy on purpose (label_noise 0.3: near-miss answers), which is what GRPO
removes (configs/grpo.py). This run is shipped as rft/assets/arith_base.
`:smoke` runs in seconds.
"""
from ml_collections import config_dict

from rft import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, ("smoke",))
  c = config_dict.ConfigDict()
  c.trainer = "pretrain_arith"
  c.seed = 0
  # World (rft.data.arithmetic.ArithmeticWorld).
  c.max_operand = 99
  c.ops = "+-*"
  c.holdout_fraction = 0.2
  c.split_seed = 0
  # Fraction of pretraining answers replaced by a near miss (true value +- 1..10).
  c.label_noise = 0.3
  # Model (rft.models.lm.LMConfig keys; vocab and max positions come from the world).
  c.model = config_dict.ConfigDict({
      "hidden_size": 128, "intermediate_size": 384, "num_layers": 4, "num_heads": 4,
      "num_kv_heads": 2, "tie_word_embeddings": True, "rope_theta": 10000.0,
  })
  # Optimisation.
  c.steps = 1500
  c.batch_size = 256
  c.lr = 1e-3
  c.warmup = 100
  c.weight_decay = 1e-4
  c.grad_clip = 1.0
  c.log_every = 50
  c.ckpt_every = 500
  c.eval_every = 500
  c.eval_problems = 512
  c.export_dir = ""
  if "smoke" in variants:
    c.steps, c.batch_size, c.log_every, c.ckpt_every, c.eval_every = 4, 8, 2, 2, 4
    c.eval_problems = 8
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
  return config_lib.lock(c)
