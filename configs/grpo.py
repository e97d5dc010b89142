"""GRPO and its variants on the arithmetic world (the LM main job).

COMMAND:
  python -m rft.main --config=configs/grpo.py            # GRPO
  python -m rft.main --config=configs/grpo.py:dapo       # DAPO: clip-higher, token-mean
                                                         # loss, dynamic sampling, overlong
  python -m rft.main --config=configs/grpo.py:dr_grpo    # Dr.GRPO
  python -m rft.main --config=configs/grpo.py:gspo       # GSPO (sequence-level ratio)
  python -m rft.main --config=configs/grpo.py:rloo       # RLOO advantages
  python -m rft.main --config=configs/grpo.py:raft       # RAFT (rejection-sampling SFT)
  python -m rft.main --config=configs/grpo.py:rebel      # REBEL (pair regression to θ_old)
  python -m rft.main --config=configs/grpo.py:copg       # CoPG (pair regression to π_ref)
  python -m rft.main --config=configs/grpo.py:process    # GRPO with per-token advantages
                                                         # from a process reward

  # A real HF model (Llama / Qwen2 / Qwen3 safetensors folder, or a hub id already in the
  # HF cache) on a prompt file of math problems (.jsonl / .json / .parquet with
  # "prompt"/"question"/"problem" and "answer"/"solution" fields, optional "split"):
  python -m rft.main --config=configs/grpo.py:hf_math \\
      --config.model_path=Qwen/Qwen2.5-0.5B-Instruct --config.prompt_file=gsm8k_train.jsonl
  # writes <workdir>/hf_model (config.json, model.safetensors, tokenizer files).
  # hf_math combines with the loss variants (hf_math,dapo) and with smoke.

EXPECTED: 300 steps x 128 problems x 8 completions, 11.7 min on a 2-core CPU: held-out
exact match (sampled at T = 1) 43.0 -> 68.9 %, greedy 82.0 -> 83.4 % (512 problems per
split); training problems 46.7 -> 70.5 % sampled. Curve and variants: README.
Variants combine with commas (e.g. `dapo,smoke`); `kl` adds a k3 KL penalty (beta 0.04).
hf_math: reward "math_answer" (the last \\boxed{} of the completion vs. the reference),
the Qwen-math system prompt asking for a boxed answer, 512-token completions, lr 1e-6;
add a format term with e.g. --config.reward=math_answer:1,format:0.2 and a system prompt
asking for <think>...</think><answer>...</answer>.
"""
from ml_collections import config_dict

from rft import config as config_lib

VARIANTS = ("smoke", "dapo", "dr_grpo", "gspo", "rloo", "bnpo", "raft", "rebel", "copg", "kl",
            "hf_math", "process")
BOXED_SYSTEM_PROMPT = ("Please reason step by step, and put your final answer within "
                       "\\boxed{}.")


def get_config(arg=None):
  variants = config_lib.parse_arg(arg, VARIANTS)
  c = config_dict.ConfigDict()
  c.trainer = "lm_rl"
  c.seed = 0
  c.base_dir = ""  # "" = the arithmetic LM shipped in rft/assets (pretrained if absent)
  # A real model instead: a local HF folder or a hub id in the HF cache ("" = arithmetic
  # LM), trained on the problems of prompt_file (see rft.data.lm_tasks.PromptFileTask).
  c.model_path = ""
  c.allow_pickle = False  # also load pytorch_model.bin / *.pt weights (unpickling)
  c.prompt_file = ""
  c.prompt_key = "prompt"  # aliases tried when absent: question, problem
  c.answer_key = "answer"  # aliases: solution, ground_truth, reward_model.ground_truth
  c.system_prompt = ""  # "" = no system message
  c.use_chat_template = True
  c.max_prompt_len = 256  # tokens, chat template included; longer prompts are an error
  c.heldout_fraction = 0.1  # without a "split" field in the file
  # Reward: "name[:weight],..." (rft/rewards: exact_match, math_answer, format, ...).
  c.reward = "exact_match"
  # Per-reward factory options (set in a config file or from Python: the dict starts
  # empty), e.g. {"ensemble": {"members": "math_answer,exact_match", "combine": "min"}} or
  # {"math_answer": {"shaping": "par", "shaping_reference": 0.5}} (rft/rewards/base.py).
  c.reward_options = config_dict.ConfigDict()
  # Several rewards: "sum_then_normalize" (weighted sum, then group advantages) or
  # "normalize_then_sum" (each reward normalised within its group, then summed; GDPO).
  c.reward_aggregation = "sum_then_normalize"
  c.sampling = config_dict.ConfigDict(
      {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
  # Step: prompts_per_step problems x group_size completions from theta_old, then
  # inner_iterations passes (mu) over `minibatches` minibatches of whole groups.
  c.steps = 300
  c.prompts_per_step = 128
  c.group_size = 8
  c.inner_iterations = 1
  c.minibatches = 1
  c.objective = config_dict.ConfigDict({
      "name": "grpo",  # "grpo" (policy-gradient family, see `loss`) | "raft" | "rebel" | "copg"
      "loss": "grpo",  # preset: grpo | dapo | dr_grpo | gspo | bnpo (rft.objectives.grpo)
      # Overrides of the preset ("" / -1 = keep the preset's value).
      "advantage": "",  # grpo | dr_grpo | rloo
      "scale_rewards": "",  # group | batch | none
      "clip_eps": -1.0,
      "clip_eps_high": -1.0,
      "importance": "",  # token | sequence
      "aggregation": "",  # grpo | bnpo | dr_grpo | dapo
      "kl_estimator": "",  # k1 | k3
      "beta": 0.0,  # KL weight; 0 = no reference model held (CoPG: its β, must be > 0)
      # DAPO extras.
      "dynamic_sampling": False,  # drop groups whose rewards all agree, refill the batch
      "max_rounds": 4,
      "overlong_filter": False,  # truncated completions drop out of the loss
      "overlong_buffer": 0,  # soft overlong punishment over the last N tokens; 0 = off
      "keep": 1,  # RAFT: completions kept per prompt
      # RAFT: a kept completion must also score above this (0: with a 0/1 reward only
      # correct ones are trained on; -inf keeps each group's best whatever it scored).
      "min_reward": 0.0,
      # REBEL / CoPG (rft.objectives.rebel, copg): pairs of completions of a prompt,
      # "all" (i < j) or "consecutive" ((0, 1), (2, 3), ...; even group_size).
      "pairs": "all",
      "eta": 1.0,  # REBEL's η: log-ratio differences to θ_old are divided by it
      # Per-token advantages from a dense reward's step rewards (rft.rewards.dense;
      # DeepSeekMath's process supervision) instead of one advantage per completion.
      "process_rewards": False,
  })
  c.lr = 1e-4
  c.warmup = 20
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  # Stop (before checkpointing) when the trained params' norm exceeds this many times its
  # value before training (finite but diverged, e.g. a huge lr); 0 = off.
  c.max_param_norm_ratio = 100.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.99
  c.adam_eps = 1e-8
  c.eval_every = 50
  c.eval_problems = 512
  c.eval_seed = 0
  c.log_every = 10
  c.ckpt_every = 25
  # Devices (rft.placement): mesh axes data / fsdp / tensor (-1 = the rest; rollouts and
  # minibatches split over data x fsdp); sharding rules of the trained params (Adam state
  # follows), the frozen reference (beta > 0) and the reward model: lm = Megatron
  # tensor-parallel attention / MLP + FSDP by size, default = FSDP by size, replicate.
  c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding = config_dict.ConfigDict(
      {"trained": "lm", "frozen": "lm", "reward": "replicate", "min_size": 2 ** 18})
  o = c.objective
  if "hf_math" in variants:
    c.model_path = config_lib.required("--config.model_path=<HF model folder or hub id>")
    c.prompt_file = config_lib.required("--config.prompt_file=<.jsonl/.json/.parquet>")
    c.reward = "math_answer"
    c.system_prompt = BOXED_SYSTEM_PROMPT
    c.sampling.max_new_tokens = 512
    c.steps, c.prompts_per_step, c.group_size = 200, 32, 8
    c.lr, c.warmup = 1e-6, 10
    c.eval_every, c.eval_problems, c.log_every, c.ckpt_every = 25, 128, 5, 25
  if "dapo" in variants:
    o.loss, o.dynamic_sampling, o.overlong_filter, o.overlong_buffer = "dapo", True, True, 2
  if "dr_grpo" in variants:
    o.loss = "dr_grpo"
  if "gspo" in variants:
    o.loss = "gspo"
  if "bnpo" in variants:
    o.loss = "bnpo"
  if "rloo" in variants:
    o.advantage = "rloo"
  if "raft" in variants:
    o.name = "raft"
  if "rebel" in variants and "copg" in variants:
    raise ValueError("variants rebel and copg pick two objectives; keep one")
  if "rebel" in variants:
    o.name = "rebel"
  if "copg" in variants:
    o.name, o.beta = "copg", 0.1
  if "process" in variants:
    c.reward, o.process_rewards = "arith_digits", True
  if "kl" in variants:
    if o.name in ("rebel", "copg"):
      raise ValueError("the kl variant sets GRPO's k3 penalty; with rebel or copg set "
                       "--config.objective.beta instead")
    o.beta, o.kl_estimator = 0.04, "k3"
  if "smoke" in variants:
    c.steps, c.prompts_per_step, c.group_size = 2, 2, 4
    c.eval_every, c.eval_problems, c.log_every, c.ckpt_every = 2, 8, 1, 1
    if "hf_math" in variants:
      c.sampling.max_new_tokens = 8
  return config_lib.lock(c)
