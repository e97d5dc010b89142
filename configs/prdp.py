"""PRDP (Deng et al., CVPR 2024) on ShapesWorld: the main job.

COMMAND:
  python -m rft.main --config=configs/prdp.py

The default is PRDP's small-scale setting (its Table 1) on ShapesWorld, the PRDP row of
`python -m rft.repro prdp_table1 --preset cpu_long`: 32 fixed training captions, 120
epochs x 512 samples (32 captions x 16, one on-policy update each), 61,440 reward
queries, judged by the independent evaluator on those captions (8 samples each) and on
256 held-out captions. It starts from the base that reads position words
(rft/assets/positions), trains the UNet's low-resolution blocks with Adam lr 3e-4, and
uses the two variance levers of rft.objectives.step_baselines (a group shares its
initial noise; per-step x0_reward baselines) on 8 XLA CPU devices.
EXPECTED (3 seeds, 95 % t interval): seen-caption alignment 66.0 -> 76.8 %, gain +10.8
[8.0, 13.6] points; unseen +4.0 [-0.3, 8.4]; 26.8-27.7 min per run on one 2-core CPU
(the same host took 1.5x as long on another day).

Variants:
  short         the same for 40 epochs (20,480 reward queries; T1's `cpu` row): seen
                gain +6.2 [5.6, 6.7] over 5 seeds, 9 min per run on the faster 2-core CPU
  all_captions  the earlier main job: every training caption, the original base
                (rft/assets), the whole UNet at lr 2e-5, 60 epochs x 64 prompts x 8, no
                variance levers (held-out alignment 36.3 -> 40.6 % in 30 min, one seed;
                the README's method table)
  flow          the same on the shipped rectified-flow base (a DiT; flow SDE at noise
                level 0.7, its last two blocks at lr 3e-4, 20 epochs, judged with the
                Euler ODE): the PRDP row of `python -m rft.repro flow_methods`
  smoke         any of the above shrunk to seconds (`prdp.py:smoke`, `prdp.py:all_captions,smoke`)
  paper_small / paper_large   Table 4 hyperparameters (on all_captions for ShapesWorld)

Stable Diffusion (rft.weights.sd; needs the model files locally, see README "Real models"):
  sd14_hpsv2      SD 1.4, 45 animals, HPSv2, Table 4 small scale (E=100, K=10, N=32, B=16,
                  beta 3e-5, eps 1e-6, lr 1e-5)
  sd14_pickscore  the same with PickScore
  hpdv2_hpsv2     HPDv2 train prompts, HPSv2, Table 4 large scale (E=1000, K=1, N=64, B=8,
                  beta 3e-6, eps 1e-4, lr 7e-6)
  multi_reward    large scale with 10 PickScore + 2 HPSv2 + 0.05 Aesthetic
Sampling as DDPO: 50 DDIM steps, eta 1, CFG 5; LoRA (rank 4) on the UNet attention
projections. Reward files go in config.reward_options (see rft/rewards/clip_rewards.py);
e.g. --config.reward_options.hpsv2.weights_file=/path/HPS_v2_compressed.pt.
"""
from ml_collections import config_dict

from rft import config as config_lib
from rft.configs import common


SD_VARIANTS = ("sd14_hpsv2", "sd14_pickscore", "hpdv2_hpsv2", "multi_reward")
SD_REWARDS = {
    "sd14_hpsv2": ("hpsv2", common.reward_files("hpsv2")),
    "sd14_pickscore": ("pickscore", common.reward_files("pickscore")),
    "hpdv2_hpsv2": ("hpsv2", common.reward_files("hpsv2")),
    "multi_reward": ("pickscore:10,hpsv2:2,aesthetic:0.05",
                     common.reward_files("pickscore", "hpsv2", "aesthetic")),
}


# The main job's setting (PRDP Table 1's small scale on ShapesWorld): the overrides of the
# T1 table's PRDP row (rft/repro/tables.py; tests/test_repro.py checks that the two agree).
SMALL_SCALE = {
    "base_dir": "assets/positions",  # the base that reads position words
    "train_prompts": 32,
    "eval_prompts": 256,
    "eval_batch_size": 256,
    "prompts_per_epoch": 32,
    "samples_per_prompt": 16,
    "prompts_per_update": 32,
    "updates_per_epoch": 1,
    "lr": 3e-4,
    # Only the low-resolution UNet blocks train: their gradient's noise scale is lowest,
    # and the backward pass stops at the first frozen layer.
    "finetune.trainable": r"^unet/(mid|down2|up2)",
    "share_initial_noise": True,
    "objective.step_baseline": "x0_reward",
    "epochs": 120,
    "eval_every": 10,
    "ckpt_every": 5,
    "cpu_devices": 8,  # XLA CPU devices on a CPU host (ignored on GPU / TPU)
}

# `flow`: the same on the shipped rectified-flow base (a DiT; README "Flow matching"),
# sampled with the flow SDE at noise level 0.7, the last two of the DiT's four blocks
# trained, 20 epochs, judged with the Euler ODE: the PRDP row of
# `python -m rft.repro flow_methods`.
FLOW = {
    "base_dir": "assets/flow",
    "sampler.name": "flow",
    "sampler.eta": 0.7,
    "finetune.trainable": r"^dit/(block2|block3|final_)",
    "epochs": 20,
    "eval_every": 5,
    "eval_sampler.eta": 0.0,
}


def get_config(arg=None):
  variants = config_lib.parse_arg(
      arg, ("smoke", "short", "flow", "all_captions", "paper_small", "paper_large") +
      SD_VARIANTS)
  if "flow" in variants and variants - {"flow", "smoke"}:
    raise ValueError("the `flow` variant is the small-scale setting on the rectified-flow "
                     f"base; it does not combine with {sorted(variants - {'flow', 'smoke'})}")
  c = common.base()
  c.objective = config_dict.ConfigDict({
      "name": "prdp",
      "beta": 1e-3,  # KL weight: targets are (r(a) - r(b)) / beta
      "clip_eps": 1e-3,  # proximal clip of each per-step log ratio around theta_old; 0 = off
      "reduce": "mean",  # aggregate per-step log ratios over steps: "mean" (ref code) | "sum" (paper Eq.)
      # Pairs with equal rewards are left out, as in the paper's reference code (its
      # Appendix G); the main text's Eq. sums over all pairs. Ties only happen with
      # discrete or saturated rewards (HPSv2 / PickScore scores never tie); a tied pair's
      # target is 0, so its term only asks that the two implicit rewards stay equal.
      "drop_ties": True,
      "timestep_fraction": 1.0,
      # Per-step baseline (rft.objectives.step_baselines): "none" or "x0_reward" (the reward
      # of the sampler's x0 prediction at each step; same expected gradient, less noise).
      "step_baseline": "none",
      # GAE lambda over the step baselines: 1 = unbiased (r - b_t); 0 = b_{t+1} - b_t.
      "baseline_lambda": 1.0,
      # Final steps left out of the gradient (see rft.objectives.trajectory.select_steps).
      # Measured (rft.tools.noise_scale): the Adam-like noise scale of steps 0-5 is half
      # that of steps 0-7, and steps 8-9 alone are almost pure noise.
      "skip_last_steps": 4,
  })
  # Generic settings (the `all_captions` variant; the paper and SD variants start here):
  # one on-policy update per epoch on all 512 samples, since a second update on the same
  # samples costs as much as sampling new ones and brings almost no new information.
  c.epochs = 60
  c.prompts_per_epoch = 64
  c.samples_per_prompt = 8
  c.updates_per_epoch = 1
  c.prompts_per_update = 64
  c.lr = 2e-5
  c.eval_every = 15
  c.ckpt_every = 5
  sd = variants & set(SD_VARIANTS)
  if len(sd) > 1:
    raise ValueError(f"pick one Stable Diffusion variant, got {sorted(sd)}")
  if sd:
    variants.add("paper_large" if sd & {"hpdv2_hpsv2", "multi_reward"} else "paper_small")
    common.sd_world(c, prompt_set="hpdv2" if "paper_large" in variants else "animals45")
    c.reward, c.reward_options = SD_REWARDS[sd.pop()]
  if "paper_small" in variants or "paper_large" in variants:
    c.objective.skip_last_steps = 0
  elif c.world == "shapes" and "all_captions" not in variants:
    config_lib.apply_overrides(c, [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                   for k, v in SMALL_SCALE.items()])
    if "short" in variants:
      c.epochs = 40
    if "flow" in variants:
      config_lib.apply_overrides(c, [f"{k}={v}" for k, v in FLOW.items()])
  if "short" in variants and c.epochs != 40:
    raise ValueError("the `short` variant is the main job's setting for 40 epochs; it "
                     f"does not combine with {sorted(variants - {'short', 'smoke'})}")
  if "paper_small" in variants:  # Table 4, small scale
    c.epochs, c.updates_per_epoch = 100, 10
    c.prompts_per_epoch, c.samples_per_prompt, c.prompts_per_update = 32, 16, 32
    c.objective.beta, c.objective.clip_eps, c.lr = 3e-5, 1e-6, 1e-5
  if "paper_large" in variants:  # Table 4, large scale
    c.epochs, c.updates_per_epoch = 1000, 1
    c.prompts_per_epoch, c.samples_per_prompt, c.prompts_per_update = 64, 8, 64
    c.objective.beta, c.objective.clip_eps, c.lr = 3e-6, 1e-4, 7e-6
  if "smoke" in variants:
    common.smoke(c)
    c.objective.skip_last_steps = min(c.objective.skip_last_steps, 2)  # smoke has 3 steps
  return config_lib.lock(c)
