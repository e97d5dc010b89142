"""The paper tables as data: rows (method configs), presets, metrics and claims.

Each table is the ShapesWorld analog of one table of a paper; its claim is the *shape*
of the paper's result (which method beats which), not its numbers. A row is a config
file of configs/ plus overrides; a preset fixes the budget (cpu: this 2-core machine,
each run <= 30 min; accelerator: one GPU / TPU, the whole table <= 8 min; smoke:
seconds, for tests; sd: Stable Diffusion where the weights and an accelerator exist).
Every run of a row starts from the same base model, and every seed s sets both the
training seed and the evaluation noise (config.seed = config.eval_seed = s), so the
rows of one seed are compared on the same evaluation samples.

Metrics are read from a run's results.json: `base` is its epoch-0 evaluation, `final`
its last one, `gain` the difference (per seed, then the interval over seeds).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from rft.repro.table_spec import Claim, Metric, Preset, Row, Table  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------- shared parts

SEEN, UNSEEN = "train/alignment", "heldout/alignment"
FAMILIES = ("single", "count", "and", "relation")

# Variance levers every black-box row gets (measured with rft.tools.noise_scale; README
# "Reproducing the papers"): a group shares its initial noise, per-step x0_reward baselines.
LEVERS = {"share_initial_noise": True}
STEP_BASELINE = {"objective.step_baseline": "x0_reward"}
LEVERED = dict(LEVERS, **STEP_BASELINE)  # both, the overrides of every black-box row


# configs/prdp.py's default is T1's 120-epoch PRDP row (the main job; `:short` the
# 40-epoch one). The presets measured on the original base (rft/assets) or with the
# generic PRDP layers and rate pin what they used to inherit from the earlier defaults,
# so their commands keep meaning what they measured.
ORIGINAL_BASE = {"base_dir": ""}
ALL_CAPTIONS = dict(ORIGINAL_BASE, train_prompts=0)
GENERIC_LAYERS = {"lr": 2e-5, "finetune.trainable": "^(unet|dit|transformer)/"}
# Accelerator presets use the accelerator's devices, not a split CPU.
ON_ACCELERATOR = {"cpu_devices": 0}


def _smoke(rows: Mapping[str, Mapping[str, object]], captions: bool = True) -> Preset:
  """Seconds per run: the configs' :smoke variants, 2 seeds; with `captions`, on 4 fixed
  training captions judged on 8 (the text-to-image tables)."""
  common = {"train_prompts": 4, "eval_prompts": 8, "eval_batch_size": 8} if captions else {}
  return Preset(seeds=2, config_arg="smoke", common=common, rows=rows,
                note="smoke test (seconds per run)")


# Stable Diffusion (the paper settings of configs/prdp.py and configs/ddpo.py): judged by
# the configured reward on the prompt set's training and held-out prompts.
SD_SEEN, SD_UNSEEN = "train/config_reward", "heldout/config_reward"
SD_METRICS = (Metric(SD_SEEN, "reward (train prompts)", percent=False),
              Metric(SD_UNSEEN, "reward (held-out prompts)", percent=False))


def _sd(arg: str, rows: Mapping[str, Mapping[str, object]], claims: tuple, note: str,
        metrics: tuple = SD_METRICS) -> Preset:
  return Preset(seeds=3, config_arg=arg, common={}, rows=rows, note=note, metrics=metrics,
                claims=claims, curve_metric=SD_SEEN)


# ---------------------------------------------------------------------------- T1

T1_ROWS = (
    Row("ddpo", "ddpo", "DDPO (IS)"),
    Row("prdp", "prdp", "PRDP"),
    Row("draft", "draft", "DRaFT-1"),
    Row("alignprop", "alignprop", "AlignProp"),
    Row("raft", "raft", "RAFT"),
)

# Small scale: 32 fixed training captions, judged on them (8 samples each) and on 256
# held-out captions. One on-policy update per epoch on 32 captions x 16 samples. Only the
# low-resolution UNet blocks train (LOWRES): their gradient's noise scale is 2k-10k
# samples against > 30k for the high-resolution ones, and the backward pass stops there
# (an epoch 22.5 s -> 15.3 s). DDPO gets the same levers, layers and learning rate.
LOWRES = {"finetune.trainable": r"^unet/(mid|down2|up2)"}
_T1_RL = dict(LEVERED, **LOWRES, prompts_per_epoch=32,
              samples_per_prompt=16, prompts_per_update=32, updates_per_epoch=1, lr=3e-4)
# The base every T1 preset starts from (except cpu_original): the shipped base continued
# with the high-noise emphasis so that it reads position words (rft/assets/positions,
# configs/pretrain_shapes.py:positions; README "Where the headroom is"). On the original
# base about a third of T1's captions name a cell the denoiser ignores.
T1_BASE = {"base_dir": "assets/positions"}
_T1_COMMON = {"train_prompts": 32, "eval_prompts": 256, "eval_batch_size": 256}
T1_CPU = Preset(
    seeds=3, cpu_devices=8,
    common=dict(_T1_COMMON, **T1_BASE),
    rows={
        "prdp": dict(_T1_RL, epochs=40, eval_every=10, ckpt_every=5),
        "ddpo": dict(_T1_RL, epochs=40, eval_every=10, ckpt_every=5),
        "draft": dict(epochs=150, eval_every=50, ckpt_every=25),
        "alignprop": dict(epochs=60, eval_every=20, ckpt_every=20, lr=1e-5),
        "raft": dict(epochs=40, eval_every=20, ckpt_every=10, lr=1e-5),
    },
    note="this 2-core CPU, 8 XLA CPU devices, each run <= 30 min; base rft/assets/positions")
# The +10-point budget and the main job (configs/prdp.py's default): PRDP and DDPO for
# 120 epochs (61,440 reward queries), the rest as `cpu`. PRDP measured +10.8 [8.0, 13.6]
# seen points over 3 seeds, 26.8-27.7 min per run alone on one 2-core CPU (host B).
T1_CPU_LONG = dataclasses.replace(
    T1_CPU, rows={r: dict(T1_CPU.rows[r], epochs=120) for r in ("prdp", "ddpo")},
    note="this 2-core CPU, 8 XLA CPU devices, 120 epochs (27-28 min per PRDP run alone; "
         "the same host took 1.5x as long on another day); base rft/assets/positions")
# The same table on the original shipped base (rft/assets) with 30 RL epochs: the T1
# numbers measured before the positions base existed.
T1_CPU_ORIGINAL = dataclasses.replace(
    T1_CPU, common=dict(_T1_COMMON, **ORIGINAL_BASE),
    rows=dict(T1_CPU.rows, **{r: dict(T1_CPU.rows[r], epochs=30) for r in ("prdp", "ddpo")}),
    note="this 2-core CPU, 8 XLA CPU devices, each run <= 30 min; the original base rft/assets")

T1_ACCEL = Preset(
    seeds=3,
    common=dict(_T1_COMMON, **T1_BASE, **ON_ACCELERATOR),
    rows={r: dict(_T1_RL, samples_per_prompt=64, epochs=100, eval_every=25, ckpt_every=25,
                  unroll="none") for r in ("prdp", "ddpo")},
    note="one GPU (sized for an H100: 2,048 samples per update, the table in <= 8 min)")

PRDP_TABLE1 = Table(
    name="prdp_table1",
    title="T1, small scale: fixed training captions, reward on the same captions",
    paper=("PRDP Table 1 (SD 1.4, 45 prompts 'A painting of a <animal>', 100 epochs x 32 "
           "prompts x 16, judged on the training prompts): HPSv2 base 0.2855, DDPO 0.3398, "
           "PRDP 0.3471; PickScore base 0.2179, DDPO 0.2664, PRDP 0.2700. PRDP matches "
           "or beats DDPO, both far above the base model."),
    rows=T1_ROWS,
    metrics=(Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment"),
             Metric("train/reward", "reward (seen)", percent=False)),
    claims=(
        Claim("PRDP raises seen-caption alignment", "pos", SEEN, "prdp"),
        Claim("DDPO raises seen-caption alignment (DDPO > base)", "pos", SEEN, "ddpo"),
        Claim("PRDP >= DDPO on seen-caption alignment (within 2 points)", "geq", SEEN, "prdp",
              "ddpo", margin=0.02),
    ),
    presets={"cpu": T1_CPU, "cpu_long": T1_CPU_LONG, "cpu_original": T1_CPU_ORIGINAL,
             "accelerator": T1_ACCEL,
             "sd": _sd("sd14_hpsv2", {"ddpo": {}, "prdp": {}}, (
                 Claim("PRDP raises HPSv2 on the 45 animals", "pos", SD_SEEN, "prdp"),
                 Claim("DDPO raises HPSv2 on the 45 animals", "pos", SD_SEEN, "ddpo"),
                 Claim("PRDP >= DDPO on HPSv2", "geq", SD_SEEN, "prdp", "ddpo")),
                 "SD 1.4, Table 4 small-scale settings, where the weights exist"),
             "smoke": _smoke({"prdp": LEVERED, "ddpo": LEVERED})},
)

# ---------------------------------------------------------------------------- T2

T2_METRICS = (Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment")) + tuple(
    Metric(f"heldout/alignment_{f}", f"unseen {f}") for f in FAMILIES)

_T2_RL = dict(LEVERED, prompts_per_epoch=32, samples_per_prompt=16,
              prompts_per_update=32, updates_per_epoch=1)
_T2_CPU = dict(_T2_RL, **LOWRES, lr=3e-4, epochs=15, eval_every=5, ckpt_every=5)

PRDP_TABLE2 = Table(
    name="prdp_table2",
    title="T2, large scale: all training captions, judged on seen and unseen captions",
    paper=("PRDP Table 2 (SD 1.4, 1000 epochs on 100k+ HPDv2 training prompts, HPSv2 on "
           "seen and unseen prompts): seen 0.2685 base / 0.2464 DDPO / 0.3175 PRDP; unseen "
           "per HPDv2 category (animation, concept art, painting, photo) base 0.2737 / "
           "0.2656 / 0.2654 / 0.2750, DDPO 0.2673 / 0.2558 / 0.2570 / 0.2093, PRDP 0.3223 / "
           "0.3175 / 0.3172 / 0.3159. PRDP improves every split; DDPO degrades."),
    rows=(Row("ddpo", "ddpo", "DDPO (IS)"), Row("prdp", "prdp", "PRDP")),
    metrics=T2_METRICS,
    claims=(
        Claim("PRDP raises seen-caption alignment", "pos", SEEN, "prdp"),
        Claim("PRDP raises unseen-caption alignment", "pos", UNSEEN, "prdp"),
        Claim("PRDP gains more than DDPO on unseen captions", "gt", UNSEEN, "prdp", "ddpo"),
    ),
    presets={
        "cpu": Preset(seeds=3, cpu_devices=8,
                      common=dict(T1_BASE, train_prompts=0, eval_prompts=256,
                                  eval_batch_size=256),
                      rows={"prdp": _T2_CPU, "ddpo": _T2_CPU},
                      note="this 2-core CPU, shrunk: 15 epochs x 512 samples per run, the "
                           "T1 recipe (low-res blocks, lr 3e-4) on all training captions; "
                           "base rft/assets/positions"),
        # The same budget on the original base (rft/assets), measured before the positions
        # base existed.
        "cpu_original": Preset(seeds=3, cpu_devices=8,
                               common=dict(ALL_CAPTIONS, eval_prompts=256, eval_batch_size=256),
                               rows={"prdp": _T2_CPU, "ddpo": _T2_CPU},
                               note="this 2-core CPU, shrunk: 15 epochs x 512 samples per run, "
                                    "the T1 recipe (low-res blocks, lr 3e-4) on all training "
                                    "captions; the original base rft/assets"),
        "accelerator": Preset(
            seeds=3, common=dict(ALL_CAPTIONS, **ON_ACCELERATOR, eval_prompts=256,
                                 eval_batch_size=256),
            rows={r: dict(_T2_RL, **GENERIC_LAYERS, samples_per_prompt=16,
                          prompts_per_epoch=128,
                          prompts_per_update=128, epochs=100, eval_every=25, ckpt_every=25,
                          unroll="none") for r in ("prdp", "ddpo")},
            note="one GPU (2,048 samples per update over 128 captions, <= 8 min per table)"),
        "sd": _sd("hpdv2_hpsv2", {"ddpo": {}, "prdp": {}}, (
            Claim("PRDP raises HPSv2 on held-out HPDv2 prompts", "pos", SD_UNSEEN, "prdp"),
            Claim("PRDP gains more than DDPO on held-out prompts", "gt", SD_UNSEEN, "prdp",
                  "ddpo")),
            "SD 1.4 on the HPDv2 training prompts, Table 4 large-scale settings"),
        "smoke": _smoke({r: dict(LEVERED, **ALL_CAPTIONS, **GENERIC_LAYERS)
                         for r in ("prdp", "ddpo")}),
    },
)

# ---------------------------------------------------------------------------- T3

MULTI_REWARD = "shapes_alignment:1,saturation:0.5"

PRDP_TABLE3 = Table(
    name="prdp_table3",
    title="T3, multi-reward: alignment plus an image-quality term, weighted",
    paper=("PRDP Table 3 (10 PickScore + 2 HPSv2 + 0.05 Aesthetic, Pick-a-Pic prompts): the "
           "weighted sum rises on every test split, e.g. Pick-a-Pic test 2.888 -> 3.208, "
           "photo 2.984 -> 3.214 (only the sum is reported)."),
    rows=(Row("prdp", "prdp", "PRDP"),),
    metrics=(Metric("train/config_reward", "weighted reward (seen)", percent=False),
             Metric("train/config_reward_saturation", "saturation (seen)", percent=False),
             Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment")),
    claims=(
        Claim("PRDP raises the weighted reward", "pos", "train/config_reward", "prdp"),
        Claim("PRDP raises the saturation term", "pos", "train/config_reward_saturation",
              "prdp"),
        Claim("... without losing seen-caption alignment (within 2 points)", "geq", SEEN,
              "prdp", margin=0.02),
    ),
    presets={
        "cpu": Preset(seeds=3, cpu_devices=8,
                      common=dict(ORIGINAL_BASE, train_prompts=32, eval_prompts=256,
                                  eval_batch_size=256, reward=MULTI_REWARD),
                      rows={"prdp": T1_CPU_ORIGINAL.rows["prdp"]},
                      note="this 2-core CPU, T1's original-base budget (30 epochs)"),
        "accelerator": Preset(seeds=3, common=dict(ORIGINAL_BASE, **ON_ACCELERATOR,
                                                   train_prompts=32, eval_prompts=256,
                                                   eval_batch_size=256, reward=MULTI_REWARD),
                              rows={"prdp": T1_ACCEL.rows["prdp"]},
                              note="one GPU, the T1 budget"),
        "sd": _sd("multi_reward", {"prdp": {}}, (
            Claim("PRDP raises the weighted reward (10 PickScore + 2 HPSv2 + 0.05 "
                  "Aesthetic)", "pos", SD_SEEN, "prdp"),) + tuple(
            Claim(f"PRDP raises {t}", "pos", f"train/reward_{t}", "prdp")
            for t in ("pickscore", "hpsv2", "aesthetic")),
            "SD 1.4 on HPDv2 prompts, multi-reward", metrics=SD_METRICS + tuple(
                Metric(f"train/reward_{t}", t, percent=False)
                for t in ("pickscore", "hpsv2", "aesthetic"))),
        "smoke": Preset(seeds=2, config_arg="smoke",
                        common=dict(ORIGINAL_BASE, **GENERIC_LAYERS, train_prompts=4,
                                    eval_prompts=8, eval_batch_size=8, reward=MULTI_REWARD),
                        rows={"prdp": LEVERED},
                        note="smoke test (seconds per run)"),
    },
)

# ---------------------------------------------------------------------------- T5

# T5 runs T1's recipe (positions base, low-resolution blocks, lr 3e-4, both levers) with
# K = 8 updates per epoch on the same samples. On the cpu preset an epoch is 16 of the 32
# training captions x 8 samples: an update over 512 samples takes about 14 s here, so
# K = 8 of them would make a 10-epoch run 25 min; 128 samples per update keeps it near 8.
_T5_RL = dict(LEVERED, **LOWRES, lr=3e-4, updates_per_epoch=8)
_T5_COMMON = dict(_T5_RL, **_T1_COMMON, **T1_BASE)
NO_CLIP = {"objective.clip_eps": 0.0}

PRDP_TABLE5 = Table(
    name="prdp_table5",
    title="T5, ablation: PRDP with and without the proximal clip at K = 8 updates per epoch",
    paper=("PRDP Table 5 / Fig. 3 (qualitative): without the per-step clip, RDP with K = 10 "
           "updates per epoch is unstable at small and large scale (samples turn to noise); "
           "with it, stable at both."),
    rows=(Row("prdp", "prdp", "PRDP (clip)"), Row("rdp", "prdp", "RDP, no clip")),
    metrics=(Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment"),
             Metric("max_kl", "largest KL to the base", percent=False)),
    claims=(
        Claim("clipped PRDP ends with higher seen-caption alignment than unclipped RDP",
              "gt", SEEN, "prdp", "rdp", on="final"),
        Claim("unclipped RDP drifts further from the base (larger KL)", "gt", "max_kl",
              "rdp", "prdp", on="final"),
    ),
    presets={
        "cpu": Preset(seeds=3, cpu_devices=8,
                      common=dict(_T5_COMMON, prompts_per_epoch=16, samples_per_prompt=8,
                                  prompts_per_update=16),
                      rows={"prdp": dict(epochs=10, eval_every=5, ckpt_every=5),
                            "rdp": dict(epochs=10, eval_every=5, ckpt_every=5, **NO_CLIP)},
                      note="this 2-core CPU, 10 epochs x 8 updates of 128 samples (16 "
                           "captions x 8) per run; base rft/assets/positions"),
        "accelerator": Preset(
            seeds=3, common=dict(_T5_COMMON, **ON_ACCELERATOR, prompts_per_epoch=32,
                                 samples_per_prompt=64, prompts_per_update=32, unroll="none"),
            rows={"prdp": dict(epochs=40, eval_every=10, ckpt_every=10),
                  "rdp": dict(epochs=40, eval_every=10, ckpt_every=10, **NO_CLIP)},
            note="one GPU, 40 epochs x 8 updates of 2,048 samples"),
        "sd": _sd("sd14_hpsv2", {"prdp": {}, "rdp": {"objective.clip_eps": 0.0}}, (
            Claim("clipped PRDP ends with a higher HPSv2 than unclipped RDP", "gt", SD_SEEN,
                  "prdp", "rdp", on="final"),
            Claim("unclipped RDP drifts further from the base (larger KL)", "gt", "max_kl",
                  "rdp", "prdp", on="final")),
            "SD 1.4, Table 4 small scale (K = 10 updates per epoch)",
            metrics=SD_METRICS + (Metric("max_kl", "largest KL to the base", percent=False),)),
        "smoke": _smoke({"prdp": dict(LEVERED, **ORIGINAL_BASE, **GENERIC_LAYERS,
                                      updates_per_epoch=2),
                         "rdp": dict(LEVERED, **ORIGINAL_BASE, **GENERIC_LAYERS,
                                     updates_per_epoch=2, **{"objective.clip_eps": 0.0})}),
    },
)

# ---------------------------------------------------------------------------- reward hacking

# ReNO (inference time: each caption's initial noise optimised against the reward, the
# base frozen) against learned rewards, judged by the independent evaluator. The
# preference reward models are configs/reward_model.py:shapes runs of seeds 0, 1, 2
# (caption-conditioned image scorers trained on ground-truth pairs of renders), shipped in
# rft/assets/shapes_preference/seed<k>. The attribute classifier (shapes_alignment_log,
# ReNO's default) is the reference: a reward whose structure follows the caption grammar.
PREFERENCE_RMS = tuple(f"assets/shapes_preference/seed{k}" for k in range(3))


# A Bradley-Terry model is defined up to an offset: the seeds' scores sit at offsets 0.70,
# 7.63, 0.47 (std 5.2-5.6) on their clean evaluation pairs. The `_z` rows standardise
# each member by its bundle's score_stats before combining; the plain rows combine raw
# scores (min then never picks seed 1, and std measures the offsets, not disagreement).


def _preference(path: str, standardize: bool = False) -> dict:
  return dict({"name": "shapes_preference", "path": path},
              **({"standardize": True} if standardize else {}))


def _ensemble(combine: str, standardize: bool = False) -> dict:
  return {"reward": "ensemble", "reward_options.ensemble.combine": combine,
          "reward_options.ensemble.members": [_preference(p, standardize)
                                              for p in PREFERENCE_RMS]}


# PAR (Fu et al. 2025, rft.rewards.shaping.par): the single RM's score r becomes
# sigmoid(r - r_ref), bounded and flat far above the reference. r_ref = 1.8, the base
# model's mean score under that RM on ReNO's captions at its start (1.4-2.3 over both
# splits and the three seeds' runs of the `single` row).
PAR_REFERENCE = 1.8

HACK_ROWS = {
    "classifier": {},
    "single": {"reward": "shapes_preference",
               "reward_options.shapes_preference.path": PREFERENCE_RMS[0]},
    "par": {"reward": "shapes_preference",
            "reward_options.shapes_preference.path": PREFERENCE_RMS[0],
            "reward_options.shapes_preference.shaping": "par",
            "reward_options.shapes_preference.shaping_reference": PAR_REFERENCE},
    "mean": _ensemble("mean"),
    "min": _ensemble("min"),
    "mean_minus_std": _ensemble("mean_minus_std"),
    "mean_z": _ensemble("mean", standardize=True),
    "min_z": _ensemble("min", standardize=True),
    "mean_minus_std_z": _ensemble("mean_minus_std", standardize=True),
}

REWARD_HACKING = Table(
    name="reward_hacking",
    title="Reward hacking: ReNO against one preference reward model and against ensembles",
    paper=("Eisenstein et al. 2023 ('Helping or Herding? Reward Model Ensembles Mitigate but "
           "do not Eliminate Reward Hacking'): optimising against an ensemble of reward "
           "models (mean, min, mean - std) overoptimises less than against one member, but "
           "the ensemble is still hacked, since its members share errors; Coste et al. 2023: "
           "worst-case (min) and uncertainty-weighted ensembles reduce overoptimization."),
    rows=(Row("classifier", "reno", "attribute classifier, log P(caption) (reference)"),
          Row("single", "reno", "one preference RM (seed 0)"),
          Row("par", "reno", "the same RM shaped by PAR, sigmoid(r - 1.8)"),
          Row("mean", "reno", "ensemble of 3, mean"),
          Row("min", "reno", "ensemble of 3, min (WCO)"),
          Row("mean_minus_std", "reno", "ensemble of 3, mean - std"),
          Row("mean_z", "reno", "ensemble of 3 standardised, mean"),
          Row("min_z", "reno", "ensemble of 3 standardised, min (WCO)"),
          Row("mean_minus_std_z", "reno", "ensemble of 3 standardised, mean - std")),
    metrics=(Metric(UNSEEN, "held-out alignment"), Metric(SEEN, "training-caption alignment"),
             Metric("heldout/p_caption", "classifier P(caption), held-out", percent=False),
             Metric("heldout/reward", "optimised reward, held-out", percent=False)),
    claims=(
        Claim("the preference RM is hacked: ReNO against it gains less held-out alignment "
              "than against the attribute classifier", "gt", UNSEEN, "classifier", "single"),
        Claim("ensemble mean mitigates: more held-out alignment than one RM", "gt", UNSEEN,
              "mean", "single"),
        Claim("PAR shaping mitigates: more held-out alignment than the unshaped RM", "gt",
              UNSEEN, "par", "single"),
        Claim("ensemble min mitigates: more held-out alignment than one RM", "gt", UNSEEN,
              "min", "single"),
        Claim("ensemble mean - std mitigates: more held-out alignment than one RM", "gt",
              UNSEEN, "mean_minus_std", "single"),
        Claim("... but does not eliminate: the mean ensemble still below the classifier", "gt",
              UNSEEN, "classifier", "mean"),
        Claim("standardised ensemble mean mitigates: more held-out alignment than one RM",
              "gt", UNSEEN, "mean_z", "single"),
        Claim("standardised ensemble min mitigates: more held-out alignment than one RM",
              "gt", UNSEEN, "min_z", "single"),
        Claim("standardised ensemble mean - std mitigates: more held-out alignment than one "
              "RM", "gt", UNSEEN, "mean_minus_std_z", "single"),
        Claim("... but does not eliminate: the best standardised rule (mean) still below the "
              "classifier", "gt", UNSEEN, "classifier", "mean_z"),
    ),
    presets={
        "cpu": Preset(seeds=3, common={}, rows=HACK_ROWS,
                      note="this 2-core CPU; ReNO's defaults: 32 captions per split, 20 "
                           "iterations of a 6-step DDIM sampler, the original base"),
        "smoke": _smoke(HACK_ROWS, captions=False),
    },
    curve_metric=UNSEEN,
)

# Reward backprop against the same rewards: DRaFT with gradients through the whole
# 10-step chain (configs/draft.py:full) on T1's 32 training captions from T1's base
# (rft/assets/positions), training T1's low-resolution UNet blocks. It trains the model
# (ReNO optimises each image's noise), so the hacking it finds is the policy's: the
# optimised reward on the training captions against the evaluator on them. PAR's
# reference is the base model's mean score under the seed-0 RM on those captions (3.8 at
# epoch 0 of the `single` row; ReNO's 1.8 was measured on its own captions). The raw
# (unstandardised) ensemble rules are left out: their members' offsets make min and
# std meaningless (above).
DRAFT_PAR_REFERENCE = 3.8
DRAFT_HACK_ROWS = {
    "classifier": {},
    "single": HACK_ROWS["single"],
    "par": dict(HACK_ROWS["par"], **{
        "reward_options.shapes_preference.shaping_reference": DRAFT_PAR_REFERENCE}),
    "mean_z": HACK_ROWS["mean_z"],
    "min_z": HACK_ROWS["min_z"],
    "mean_minus_std_z": HACK_ROWS["mean_minus_std_z"],
}
OPTIMISED = "train/config_reward"  # the configured reward's score of the evaluation images

REWARD_HACKING_DRAFT = Table(
    name="reward_hacking_draft",
    title="Reward hacking under reward backprop: DRaFT against one preference reward model, "
          "PAR and ensembles",
    paper=REWARD_HACKING.paper + (" DRaFT / AlignProp (Clark et al. 2024; Prabhudesai et "
                                  "al. 2023) optimise the reward by its gradient and are "
                                  "the most direct test of over-optimisation."),
    rows=(Row("classifier", "draft:full", "attribute classifier, P(caption) (reference)"),
          Row("single", "draft:full", "one preference RM (seed 0)"),
          Row("par", "draft:full", f"the same RM shaped by PAR, sigmoid(r - "
                                   f"{DRAFT_PAR_REFERENCE})"),
          Row("mean_z", "draft:full", "ensemble of 3 standardised, mean"),
          Row("min_z", "draft:full", "ensemble of 3 standardised, min (WCO)"),
          Row("mean_minus_std_z", "draft:full", "ensemble of 3 standardised, mean - std")),
    metrics=(Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment"),
             Metric(OPTIMISED, "optimised reward (seen)", percent=False),
             Metric("train/reward", "classifier P(caption) (seen)", percent=False)),
    claims=(
        Claim("DRaFT raises its reward model's own score on the training captions", "pos",
              OPTIMISED, "single"),
        Claim("the preference RM is hacked: DRaFT against it gains less seen alignment than "
              "against the attribute classifier", "gt", SEEN, "classifier", "single"),
        Claim("PAR shaping mitigates: more seen alignment than the unshaped RM", "gt", SEEN,
              "par", "single"),
        Claim("standardised ensemble mean mitigates: more seen alignment than one RM", "gt",
              SEEN, "mean_z", "single"),
        Claim("standardised ensemble min mitigates: more seen alignment than one RM", "gt",
              SEEN, "min_z", "single"),
        Claim("standardised ensemble mean - std mitigates: more seen alignment than one RM",
              "gt", SEEN, "mean_minus_std_z", "single"),
        Claim("... but does not eliminate: the standardised mean still below the classifier",
              "gt", SEEN, "classifier", "mean_z"),
    ),
    presets={
        "cpu": Preset(seeds=3, cpu_devices=8,
                      common=dict(_T1_COMMON, **T1_BASE, **LOWRES, epochs=150, eval_every=50,
                                  ckpt_every=50),
                      rows=DRAFT_HACK_ROWS,
                      note="this 2-core CPU, 8 XLA CPU devices, 150 updates of 32 captions "
                           "(4,800 reward queries, each with its gradient); base "
                           "rft/assets/positions, T1's captions and layers"),
        "smoke": _smoke({r: dict(T1_BASE, **o) for r, o in DRAFT_HACK_ROWS.items()}),
    },
)

# ---------------------------------------------------------------------------- flow methods

# Every flow method from the shipped rectified-flow base (rft/assets/flow) on T1's 32
# training captions, judged by the same sampler whatever trained it: the deterministic
# Euler ODE, 10 steps, CFG 1 (config.eval_sampler.eta = 0), so the rows share their
# epoch-0 evaluation. The trajectory rows (Flow-GRPO and its variants, PRDP) sample with
# the flow SDE at noise level 0.7 and get T1's variance levers, T1's share of the steps
# (the last 4 of 10 out of the gradient) and the last two of the DiT's four blocks at
# Adam 3e-4. DiffusionNFT keeps its own recipe (Euler ODE samples from a lagged policy,
# the whole DiT at 1e-4, two updates per epoch).
FLOW_BASE = {"base_dir": "assets/flow"}
ODE_EVAL = {"eval_sampler.eta": 0.0}
FLOW_LAYERS = {"finetune.trainable": r"^dit/(block2|block3|final_)", "lr": 3e-4}
_FLOW_SDE = {"sampler.name": "flow", "sampler.eta": 0.7}
_FLOW_TRAJ = dict(LEVERED, **FLOW_LAYERS, **{"objective.skip_last_steps": 4})
_FLOW_BUDGET = {"epochs": 20, "eval_every": 5, "ckpt_every": 5}
FLOW_ROWS = {
    "prdp": dict(_FLOW_TRAJ, **_FLOW_SDE, **_FLOW_BUDGET),
    "flow_grpo": dict(_FLOW_TRAJ, **_FLOW_BUDGET),
    "nft": dict(_FLOW_BUDGET),
    # NFT on the trajectory rows' layers and learning rate: its objective, their budget.
    "nft_layers": dict(_FLOW_BUDGET, **FLOW_LAYERS),
    "dance": dict(_FLOW_TRAJ, **_FLOW_BUDGET),
    # MixGRPO's window moves over all 10 steps, so none is left out of the gradient.
    "mix": dict(_FLOW_TRAJ, **_FLOW_BUDGET, **{"objective.skip_last_steps": 0}),
}

FLOW_METHODS = Table(
    name="flow_methods",
    title="Flow methods: RL on the rectified-flow ShapesWorld base (DiT)",
    paper=("Flow-GRPO (Liu et al. 2025; SD3.5-M, GenEval 0.63 -> 0.95), DiffusionNFT (Zheng "
           "et al. 2025; 'up to 25x more efficient than Flow-GRPO' in the steps to the same "
           "score), PRDP (Deng et al. 2024; here on the flow SDE, which no paper reports). "
           "Each method raises its reward; the table compares them on one base, one "
           "evaluator and one budget."),
    rows=(Row("prdp", "prdp", "PRDP on the flow SDE"),
          Row("flow_grpo", "flow_grpo", "Flow-GRPO (KL 0.04)"),
          Row("nft", "nft", "DiffusionNFT"),
          Row("nft_layers", "nft", "DiffusionNFT, the last two DiT blocks at 3e-4"),
          Row("dance", "flow_grpo:dance", "DanceGRPO (60 % of the steps, no KL)"),
          Row("mix", "flow_grpo:mix", "MixGRPO (a 2-step SDE window, no KL)")),
    metrics=(Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment"),
             Metric("train/reward", "reward (seen)", percent=False)),
    claims=(
        Claim("PRDP on the flow SDE raises seen-caption alignment", "pos", SEEN, "prdp"),
        Claim("Flow-GRPO raises seen-caption alignment", "pos", SEEN, "flow_grpo"),
        Claim("DiffusionNFT raises seen-caption alignment", "pos", SEEN, "nft"),
        Claim("DiffusionNFT gains more seen-caption alignment than Flow-GRPO at the same "
              "reward queries", "gt", SEEN, "nft", "flow_grpo"),
        Claim("PRDP >= Flow-GRPO on seen-caption alignment (within 2 points)", "geq", SEEN,
              "prdp", "flow_grpo", margin=0.02),
        Claim("DiffusionNFT on the trajectory rows' layers and lr gains more than "
              "Flow-GRPO", "gt", SEEN, "nft_layers", "flow_grpo"),
        Claim("DanceGRPO raises seen-caption alignment", "pos", SEEN, "dance"),
        Claim("MixGRPO raises seen-caption alignment", "pos", SEEN, "mix"),
    ),
    presets={
        "cpu": Preset(seeds=3, cpu_devices=8,
                      common=dict(_T1_COMMON, **FLOW_BASE, **ODE_EVAL), rows=FLOW_ROWS,
                      note="this 2-core CPU, 8 XLA CPU devices, 20 epochs x 512 samples per "
                           "run; base rft/assets/flow, judged with the Euler ODE"),
        "smoke": _smoke({r: dict(FLOW_BASE, **ODE_EVAL, **FLOW_LAYERS,
                                 **(_FLOW_SDE if r == "prdp" else {})) for r in FLOW_ROWS}),
    },
    reach=(SEEN, 0.05),
)

# ---------------------------------------------------------------------------- RM losses

# Reward models trained by Bradley-Terry on pairs, by regression (MSE) on ratings, and by
# both, on the same world's ground truth (configs/reward_model.py), judged by pairwise
# accuracy on 1,024 clean held-out pairs. The preset picks the world: `arith` (a reward
# head on the arithmetic LM, 300 steps) or `shapes` (the caption-conditioned image scorer
# from renders, 2,000 steps; the BT rows are how rft/assets/shapes_preference was made).
# The base is the untrained model's accuracy (step 0).
RM_ACCURACY = "heldout/pair_accuracy"
RM_ROWS = {"bt": {}, "regression": {}, "both": {}}

REWARD_MODEL_LOSSES = Table(
    name="reward_model_losses",
    title="Reward models: Bradley-Terry vs regression vs both",
    paper=("HelpSteer2-Preference (Wang et al. 2024): with matched data, Bradley-Terry and "
           "regression reward models are close, and a model trained with both (BT on "
           "preferences and regression on ratings) is the most accurate."),
    rows=(Row("bt", "reward_model", "Bradley-Terry on pairs"),
          Row("regression", "reward_model:regression", "regression (MSE) on ratings"),
          Row("both", "reward_model:both", "both (BT + MSE)")),
    metrics=(Metric(RM_ACCURACY, "held-out pair accuracy"),
             Metric("train/pair_accuracy", "training-prompt pair accuracy"),
             Metric("heldout/ece", "held-out ECE", percent=False)),
    claims=(
        Claim("BT + regression is more accurate than BT alone (held-out pairs)", "gt",
              RM_ACCURACY, "both", "bt"),
        Claim("BT + regression is more accurate than regression alone", "gt", RM_ACCURACY,
              "both", "regression"),
        Claim("Bradley-Terry is at least as accurate as regression (within 2 points)",
              "geq", RM_ACCURACY, "bt", "regression", margin=0.02),
    ),
    presets={
        "arith": Preset(seeds=3, common={}, rows=RM_ROWS,
                        note="this 2-core CPU; the arithmetic world, 300 steps of 64 pairs "
                             "/ ratings on the shipped LM (~7 min per run)"),
        "shapes": Preset(seeds=3, config_arg="shapes", common={}, rows=RM_ROWS,
                         note="this 2-core CPU; ShapesWorld, 2,000 steps of 64 pairs / "
                              "ratings of renders (~8-11 min per run)"),
        "smoke": _smoke(RM_ROWS, captions=False),
    },
    curve_metric=RM_ACCURACY,
    percent_of="pair accuracy",
)

# ---------------------------------------------------------------------------- LM objectives

# GRPO against the pair objectives on the arithmetic world (configs/grpo.py: 128 problems
# x 8 completions per step, exact-match reward, AdamW 1e-4): every row draws the same
# completions per step and is judged by exact match on 512 fixed held-out problems,
# sampled at T = 1 and greedy.
LM_SAMPLED, LM_GREEDY = "heldout/accuracy_sampled", "heldout/accuracy_greedy"
LM_ROWS = {"grpo": {}, "rebel": {}, "copg": {}}

LM_OBJECTIVES = Table(
    name="lm_objectives",
    title="GRPO vs REBEL vs CoPG on the arithmetic world at equal completions",
    paper=("REBEL (Gao et al. 2024): regressing reward differences on differences of "
           "log-ratios to the sampling policy matches or beats PPO on TL;DR and chat; CoPG "
           "(Flet-Berliac et al. 2024): a contrastive, off-policy-correct policy gradient "
           "on pairs that optimises the reward as well as on-policy methods. Both are pair "
           "objectives over completions of one prompt; the claim tested is that each does "
           "at least as well as GRPO at the same number of completions."),
    rows=(Row("grpo", "grpo", "GRPO"),
          Row("rebel", "grpo:rebel", "REBEL (eta 1, all pairs)"),
          Row("copg", "grpo:copg", "CoPG (beta 0.1, all pairs)")),
    metrics=(Metric(LM_SAMPLED, "held-out exact match, sampled"),
             Metric(LM_GREEDY, "held-out exact match, greedy"),
             Metric("train/accuracy_sampled", "training problems, sampled")),
    claims=(
        Claim("GRPO raises held-out sampled accuracy", "pos", LM_SAMPLED, "grpo"),
        Claim("REBEL raises held-out sampled accuracy", "pos", LM_SAMPLED, "rebel"),
        Claim("CoPG raises held-out sampled accuracy", "pos", LM_SAMPLED, "copg"),
        Claim("REBEL >= GRPO on held-out sampled accuracy (within 2 points)", "geq",
              LM_SAMPLED, "rebel", "grpo", margin=0.02),
        Claim("CoPG >= GRPO on held-out sampled accuracy (within 2 points)", "geq",
              LM_SAMPLED, "copg", "grpo", margin=0.02),
        Claim("greedy accuracy is kept: REBEL >= GRPO within 2 points", "geq", LM_GREEDY,
              "rebel", "grpo", margin=0.02),
        Claim("greedy accuracy is kept: CoPG >= GRPO within 2 points", "geq", LM_GREEDY,
              "copg", "grpo", margin=0.02),
    ),
    presets={
        "cpu": Preset(seeds=3, common={"steps": 50, "eval_every": 25, "ckpt_every": 25},
                      rows=LM_ROWS,
                      note="this 2-core CPU, 50 steps x 1,024 completions per run (51,200)"),
        "smoke": _smoke(LM_ROWS, captions=False),
    },
    curve_metric=LM_SAMPLED,
    reach=(LM_SAMPLED, 0.10),
    percent_of="exact match",
)

ALL = {t.name: t for t in (PRDP_TABLE1, PRDP_TABLE2, PRDP_TABLE3, PRDP_TABLE5,
                           REWARD_HACKING, REWARD_HACKING_DRAFT, FLOW_METHODS,
                           REWARD_MODEL_LOSSES, LM_OBJECTIVES)}


def get(name: str) -> Table:
  if name not in ALL:
    raise ValueError(f"unknown table {name!r}; known: {sorted(ALL)}")
  return ALL[name]
