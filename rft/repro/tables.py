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


@dataclasses.dataclass(frozen=True)
class Row:
  name: str  # e.g. "prdp"
  config: str  # configs/<file>.py[:arg], e.g. "prdp" or "ddpo:sf"
  label: str  # what the README calls it


@dataclasses.dataclass(frozen=True)
class Metric:
  key: str  # a results.json history key, e.g. "train/alignment", or "max_kl" (curve)
  label: str
  percent: bool = True  # shown x100 with one decimal


@dataclasses.dataclass(frozen=True)
class Claim:
  """`a` vs `b` (row names; b None: a's own change) on metric `metric`'s gain or final
  value (`on`), read with stats.verdict(kind, interval, margin)."""
  text: str
  kind: str  # gt | geq | pos
  metric: str
  a: str
  b: str | None = None
  on: str = "gain"  # gain | final
  margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class Preset:
  seeds: int
  common: Mapping[str, object]  # overrides every row gets
  rows: Mapping[str, Mapping[str, object]]  # row name -> its own overrides (present = run)
  note: str  # hardware and budget, for the README
  cpu_devices: int = 0  # split a CPU host into this many devices (rft.parallel.split_cpu)
  config_arg: str = ""  # a variant added to every row's config, e.g. "smoke"


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  paper: str  # the paper's claim and numbers
  rows: tuple[Row, ...]
  metrics: tuple[Metric, ...]
  claims: tuple[Claim, ...]
  presets: Mapping[str, Preset]
  curve_metric: str = "train/alignment"

  def row(self, name: str) -> Row:
    for r in self.rows:
      if r.name == name:
        return r
    raise KeyError(f"table {self.name} has no row {name!r}; rows: {[r.name for r in self.rows]}")

  def preset(self, name: str) -> Preset:
    if name not in self.presets:
      raise ValueError(f"table {self.name} has no preset {name!r}; presets: {sorted(self.presets)}")
    return self.presets[name]


# ---------------------------------------------------------------------------- shared parts

SEEN, UNSEEN = "train/alignment", "heldout/alignment"
FAMILIES = ("single", "count", "and", "relation")

# Variance levers every black-box row gets (measured with rft.train.noise_scale; README
# "Reproducing the papers"): a group shares its initial noise, per-step x0_reward baselines.
LEVERS = {"share_initial_noise": True}
STEP_BASELINE = {"objective.step_baseline": "x0_reward"}


def _smoke(rows: Mapping[str, Mapping[str, object]]) -> Preset:
  """Seconds per run: the configs' :smoke variants on 4 fixed captions, 2 seeds."""
  return Preset(seeds=2, config_arg="smoke",
                common={"train_prompts": 4, "eval_prompts": 8, "eval_batch_size": 8},
                rows=rows, note="smoke test (seconds per run)")


# ---------------------------------------------------------------------------- T1

T1_ROWS = (
    Row("ddpo", "ddpo", "DDPO (IS)"),
    Row("prdp", "prdp", "PRDP"),
    Row("draft", "draft", "DRaFT-1"),
    Row("alignprop", "alignprop", "AlignProp"),
    Row("raft", "raft", "RAFT"),
)

# Small scale: 32 fixed training captions, judged on them (8 samples each) and on 256
# held-out captions. One on-policy update per epoch on 32 captions x 16 samples.
T1_CPU = Preset(
    seeds=3, cpu_devices=8,
    common={"train_prompts": 32, "eval_prompts": 256, "eval_batch_size": 256},
    rows={
        "prdp": dict(LEVERS, **STEP_BASELINE, epochs=80, prompts_per_epoch=32,
                     samples_per_prompt=16, prompts_per_update=32, updates_per_epoch=1,
                     eval_every=20, ckpt_every=5),
        "ddpo": dict(LEVERS, **STEP_BASELINE, epochs=80, prompts_per_epoch=32,
                     samples_per_prompt=16, prompts_per_update=32, updates_per_epoch=1,
                     eval_every=20, ckpt_every=5),
        "draft": dict(epochs=150, eval_every=50, ckpt_every=25),
        "alignprop": dict(epochs=60, eval_every=20, ckpt_every=20, lr=1e-5),
        "raft": dict(epochs=40, eval_every=20, ckpt_every=10, lr=1e-5),
    },
    note="this 2-core CPU, 8 XLA CPU devices, each run <= 30 min")

T1_ACCEL = Preset(
    seeds=3,
    common={"train_prompts": 32, "eval_prompts": 256, "eval_batch_size": 256},
    rows={
        "prdp": dict(LEVERS, **STEP_BASELINE, epochs=100, prompts_per_epoch=32,
                     samples_per_prompt=64, prompts_per_update=32, updates_per_epoch=1,
                     eval_every=25, ckpt_every=25, unroll="none"),
        "ddpo": dict(LEVERS, **STEP_BASELINE, epochs=100, prompts_per_epoch=32,
                     samples_per_prompt=64, prompts_per_update=32, updates_per_epoch=1,
                     eval_every=25, ckpt_every=25, unroll="none"),
    },
    note="one GPU (sized for an H100: 2,048 samples per update, the table in <= 8 min)")

PRDP_TABLE1 = Table(
    name="prdp_table1",
    title="T1, small scale: fixed training captions, reward on the same captions",
    paper=("PRDP Table 1 (SD 1.4, 45 animal prompts, HPSv2 / PickScore): PRDP matches or "
           "beats DDPO's reward, both far above the base model."),
    rows=T1_ROWS,
    metrics=(Metric(SEEN, "seen alignment"), Metric(UNSEEN, "unseen alignment"),
             Metric("train/reward", "reward (seen)", percent=False)),
    claims=(
        Claim("PRDP raises seen-caption alignment", "pos", SEEN, "prdp"),
        Claim("DDPO raises seen-caption alignment (DDPO > base)", "pos", SEEN, "ddpo"),
        Claim("PRDP >= DDPO on seen-caption alignment (within 2 points)", "geq", SEEN, "prdp",
              "ddpo", margin=0.02),
    ),
    presets={"cpu": T1_CPU, "accelerator": T1_ACCEL, "smoke": _smoke({"prdp": dict(LEVERS, **STEP_BASELINE),
                                                                  "ddpo": dict(LEVERS, **STEP_BASELINE)})},
)

ALL = {t.name: t for t in (PRDP_TABLE1,)}


def get(name: str) -> Table:
  if name not in ALL:
    raise ValueError(f"unknown table {name!r}; known: {sorted(ALL)}")
  return ALL[name]
