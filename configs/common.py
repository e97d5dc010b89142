"""Shared keys of the online-loop configs (configs/prdp.py, ddpo.py, draft.py, ...).

Each config file starts from `base()`, sets its objective block and its settings, and
applies `smoke()` for its `:smoke` variant.
"""
from __future__ import annotations

from ml_collections import config_dict


def base() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.trainer = "diffusion_rl"
  c.seed = 0
  # What is finetuned (rft/worlds/diffusion_worlds.py): "shapes" (ShapesWorld), "sd"
  # (a Stable Diffusion 1.x / 2.x diffusers folder, see sd_world()) or "sd3" (a Stable
  # Diffusion 3 folder, see sd3_world()).
  c.world = "shapes"
  c.base_dir = ""  # shapes: "" = the base model shipped in rft/assets (pretrained if absent)
  c.scorer_dir = ""  # shapes: "" = the scorers shipped in rft/assets
  # sd: the model folder or cached hub id, the prompt set, resolution (0 = the model's).
  c.model_path = ""
  c.prompt_set = "animals45"
  # The field holding the prompt in a prompt file's objects or a hub dataset's rows
  # (prompt_set="datasets:<id>[/<config>][:<split>]", rft.data.hf_datasets); "" = the
  # set's default ("prompt"; Pick-a-Pic "caption").
  c.prompt_key = ""
  c.holdout_fraction = 0.0
  # shapes: train on a fixed set of this many training captions (0 = all of them; the
  # small-scale setting of PRDP's Table 1), drawn with train_prompts_seed.
  c.train_prompts = 0
  c.train_prompts_seed = 0
  c.resolution = 0
  c.dtype = "float32"  # computation dtype of the SD modules (params stay float32)
  # sd3: load T5-XXL (False: its prompt states are zeros) and its tokens per prompt
  # (0 = diffusers' 256).
  c.load_t5 = True
  c.max_sequence_length = 0
  c.allow_pickle = False  # load .bin/.pt weights (unpickling can run code)
  # Reward: "name[:weight],..." (rft/rewards: shapes_alignment, shapes_alignment_log,
  # jpeg_compressibility, jpeg_incompressibility, saturation, brightness).
  c.reward = "shapes_alignment"
  # Per-reward factory options, e.g. {"hpsv2": {"weights_file": "...", "allow_pickle": True}}.
  c.reward_options = config_dict.ConfigDict()
  # Rollout sampler (rft.diffusion.sampling registry): DDIM with eta > 0 (stochastic,
  # log-probs defined), CFG scale, x0 clipping.
  c.sampler = config_dict.ConfigDict(
      {"name": "ddim", "num_steps": 10, "eta": 1.0, "guidance_scale": 1.0, "clip_x0": 1.0})
  # Samples of one prompt start from the same x_T (DanceGRPO): group rewards then differ
  # only through the step noise the log-probs score (trajectory objectives and RAFT).
  c.share_initial_noise = False
  # MixGRPO's mixed ODE-SDE rollout (trajectory objectives): only `size` consecutive steps
  # are stochastic (and trained), the rest follow the ODE; the window starts at step 0 and
  # moves `stride` steps every `every` epochs, back to 0 past the last start (roll_back)
  # or staying there. size 0: every step stochastic (off).
  c.sde_window = config_dict.ConfigDict({"size": 0, "stride": 1, "every": 1, "roll_back": True})
  # Epoch: prompts_per_epoch prompts x samples_per_prompt samples from theta_old, then
  # updates_per_epoch updates of prompts_per_update prompts each (cycling the epoch's).
  c.epochs = 100
  c.prompts_per_epoch = 32
  c.samples_per_prompt = 8
  c.updates_per_epoch = 1
  c.prompts_per_update = 32
  # Optimiser: "adamw" or "sgd" (momentum adam_b1; rft.train.state.make_optimizer),
  # constant lr after warmup.
  c.optimizer = "adamw"
  c.lr = 1e-4
  c.warmup = 0
  c.weight_decay = 1e-4
  c.grad_clip = 1.0
  # Stop (before checkpointing) when the trained params' norm exceeds this many times its
  # value before training (finite but diverged, e.g. a huge lr); 0 = off.
  c.max_param_norm_ratio = 100.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  # EMA of the trained params (0 = off). When on, evaluation and the exported model use
  # the EMA; rollouts stay on-policy with the raw params.
  c.ema_decay = 0.0
  # What is trained: full finetuning of the params matching `trainable` (default: the
  # denoiser, a UNet, a DiT or SD3's MMDiT; the text encoders stay frozen), or LoRA.
  c.finetune = config_dict.ConfigDict({
      "mode": "full", "trainable": "^(unet|dit|transformer)/",
      "lora_rank": 4, "lora_alpha": 4.0,
      # Attention projections and UNet res-block convs (rft.models.lora.DEFAULT_TARGETS),
      # and SD3's MMDiT attention projections (SD3_LORA_TARGETS).
      "lora_targets": r"^(unet|dit)/.*/(self_attn|cross_attn)/(q|k|v|out)/kernel$|"
                      r"^unet/.*_res\d+/conv[12]/kernel$|" + SD3_LORA_TARGETS,
  })
  # Unrolling of the differentiated step scans: "auto" = full on CPU (XLA:CPU runs backward
  # convs in rolled loops ~10x slower), rolled on GPU/TPU; or "full" / "none".
  c.unroll = "auto"
  c.kl_metric = True  # log the approximate KL to the base model (one more forward scan)
  # True: score the rollout's transitions under the base model inside the rollout's own
  # loop (Trajectory.ref_log_probs) instead of a second scan over the stored latents, so
  # that XLA can compute the frozen layers policy and base share once per step. Measured
  # on the main job's shapes (benchmarks/prdp_epoch.py): 1.02x, within the noise; XLA
  # merged only the first two convolutions (README, "Cheaper samples"). Off by default.
  c.ref_in_rollout = False
  # Evaluation: independent evaluator's alignment on fixed prompt sets of both splits.
  # The evaluation samples come from the rollout sampler (config.sampler) unless these
  # say otherwise (negative: the rollout's value): eta 0 gives the deterministic ODE /
  # DDIM, the usual way to judge a flow model whatever sampler trained it.
  c.eval_sampler = config_dict.ConfigDict(
      {"eta": -1.0, "guidance_scale": -1.0, "num_steps": -1})
  c.eval_every = 10
  c.eval_prompts = 256
  c.eval_batch_size = 256
  c.eval_seed = 0
  c.ckpt_every = 10
  # Devices (rft.placement): mesh axes data / fsdp / tensor (-1 = the rest; batches split
  # over data x fsdp), and the sharding rules of the trained params (Adam state follows),
  # the frozen base params and the reward model: default (FSDP by size), unet / lm
  # (tensor-parallel blocks + FSDP) or replicate.
  c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # On a host without an accelerator, split the CPU into this many XLA devices before
  # JAX starts (0 = leave it alone). Data-parallel over them keeps both cores busy.
  c.cpu_devices = 0
  c.sharding = config_dict.ConfigDict(
      {"trained": "unet", "frozen": "unet", "reward": "replicate", "min_size": 2 ** 18})
  return c


def reward_backprop(c: config_dict.ConfigDict, epochs: int) -> None:
  """Settings shared by DRaFT and AlignProp: one sample per prompt, one update per epoch
  on 32 fresh prompts (the rollout runs inside the loss)."""
  c.samples_per_prompt = 1
  c.epochs = epochs
  c.updates_per_epoch = 1
  c.prompts_per_epoch = 32
  c.prompts_per_update = 32
  c.lr = 1e-4
  c.eval_every = 25
  c.ckpt_every = 25


def smoke(c: config_dict.ConfigDict) -> None:
  """Shrink any online config to seconds (tests run every config's smoke variant)."""
  c.epochs = 2
  c.prompts_per_epoch = 2
  c.prompts_per_update = 2
  c.samples_per_prompt = min(c.samples_per_prompt, 4)
  c.updates_per_epoch = min(c.updates_per_epoch, 2)
  c.sampler.num_steps = 3
  c.eval_every = 2
  c.eval_prompts = 4
  c.eval_batch_size = 4
  c.ckpt_every = 1
  c.cpu_devices = 0


def sd_world(c: config_dict.ConfigDict, model_path: str = "CompVis/stable-diffusion-v1-4",
             prompt_set: str = "animals45") -> None:
  """Stable Diffusion settings shared by the paper configs: 50 DDIM steps (eta 1, CFG 5,
  no x0 clipping), LoRA on the UNet's attention projections as in DDPO / PRDP's code,
  evaluation by the configured rewards on a few prompts."""
  c.world = "sd"
  c.model_path = model_path
  c.prompt_set = prompt_set
  c.sampler.num_steps = 50
  c.sampler.eta = 1.0
  c.sampler.guidance_scale = 5.0
  c.sampler.clip_x0 = None
  c.finetune.mode = "lora"
  c.finetune.lora_rank = 4
  c.finetune.lora_alpha = 4.0
  c.finetune.lora_targets = SD_LORA_TARGETS
  c.finetune.trainable = "^unet/"
  c.unroll = "none"
  c.eval_prompts = 32
  c.eval_batch_size = 8


# LoRA on the SD UNet's attention projections (rft.models.sd_unet names).
SD_LORA_TARGETS = r"^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"
# LoRA on SD3's MMDiT attention projections, image and text streams (rft.models.mmdit
# names; the diffusers SD3 LoRA trainer's to_q/k/v/out + add_q/k/v_proj/to_add_out).
SD3_LORA_TARGETS = (r"^transformer/.*/attn2?/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|"
                    r"add_v_proj|to_add_out)/kernel$")


def sd3_world(c: config_dict.ConfigDict, model_path: str, prompt_set: str = "animals45",
              lora: bool = False) -> None:
  """Stable Diffusion 3 settings: the flow sampler (Flow-GRPO's SDE; eta = its noise
  level, kept from the config), CFG 4.5 (Flow-GRPO's SD3.5 setting), no x0 clipping, the
  MMDiT trained (fully, or LoRA on its attention projections with ``lora``), evaluation
  by the configured rewards on a few prompts. No base_dir is used."""
  c.world = "sd3"
  c.model_path = model_path
  c.prompt_set = prompt_set
  c.base_dir = ""
  c.sampler.name = "flow"
  c.sampler.guidance_scale = 4.5
  c.sampler.clip_x0 = None
  c.finetune.trainable = "^transformer/"
  c.finetune.lora_targets = SD3_LORA_TARGETS
  if lora:
    c.finetune.mode = "lora"
    c.finetune.lora_rank = 32
    c.finetune.lora_alpha = 64.0
  c.unroll = "none"
  c.eval_prompts = 32
  c.eval_batch_size = 8


def sd35m_pickscore(c: config_dict.ConfigDict) -> None:
  """The PickScore setting the flow papers share on Stable Diffusion 3.5 Medium
  (Flow-GRPO, DiffusionNFT): sd3_world with LoRA on Pick-a-Pic prompts, 512 px, the
  PickScore reward at its default file locations, 1,000 epochs with an evaluation every
  60 and a checkpoint every 20. Sampler and objective settings stay with each config."""
  sd3_world(c, "stabilityai/stable-diffusion-3.5-medium", prompt_set="pickapic", lora=True)
  c.resolution = 512
  c.reward = "pickscore"
  c.reward_options = reward_files("pickscore")
  c.epochs = 1000
  c.eval_every = 60
  c.ckpt_every = 20


# Where each SD reward model's files are expected by default (override with
# --config.reward_options.<name>.<key>=...): hub ids resolve in the local HF cache.
REWARD_FILES = {
    # hf://<org>/<name>/<file>: a file of a hub repo (the HF cache's copy, else downloaded)
    "hpsv2": {"weights_file": "hf://xswu/HPSv2/HPS_v2_compressed.pt", "allow_pickle": False,
              "tokenizer_path": "openai/clip-vit-large-patch14"},
    "pickscore": {"model_path": "yuvalkirstain/PickScore_v1",
                  "tokenizer_path": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "aesthetic": {"model_path": "openai/clip-vit-large-patch14",
                  "weights_file": "sac+logos+ava1-l14-linearMSE.pth", "allow_pickle": False},
    "clipscore": {"model_path": "openai/clip-vit-base-patch32"},
}


def reward_files(*names: str) -> config_dict.ConfigDict:
  """config.reward_options for the named rewards, with the default file locations."""
  return config_dict.ConfigDict({n: dict(REWARD_FILES[n]) for n in names})
