"""The schema of a paper table (rft/repro/tables.py holds the tables themselves): a
table's rows (configs), presets (budgets), metrics (results.json keys) and claims (read
with rft.repro.stats.verdict)."""
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
  cpu_devices: int = 0  # split a CPU host into this many devices (rft.placement.split_cpu)
  config_arg: str = ""  # a variant added to every row's config, e.g. "smoke"
  # What this preset measures when it differs from the table's (Stable Diffusion has no
  # independent evaluator: its metrics are the configured rewards).
  metrics: tuple[Metric, ...] | None = None
  claims: tuple[Claim, ...] | None = None
  curve_metric: str | None = None


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
  # (metric, gain): the table also reports, per row, the reward queries at which each
  # seed's evaluations first reach that gain over its epoch-0 value (sample efficiency).
  reach: tuple[str, float] | None = None
  percent_of: str = "evaluator alignment"  # what the table's percentages measure

  def row(self, name: str) -> Row:
    for r in self.rows:
      if r.name == name:
        return r
    raise KeyError(f"table {self.name} has no row {name!r}; rows: {[r.name for r in self.rows]}")

  def metrics_of(self, preset: str) -> tuple[Metric, ...]:
    return self.preset(preset).metrics or self.metrics

  def claims_of(self, preset: str) -> tuple[Claim, ...]:
    return self.preset(preset).claims or self.claims

  def curve_metric_of(self, preset: str) -> str:
    return self.preset(preset).curve_metric or self.curve_metric

  def preset(self, name: str) -> Preset:
    if name not in self.presets:
      raise ValueError(f"table {self.name} has no preset {name!r}; presets: {sorted(self.presets)}")
    return self.presets[name]
