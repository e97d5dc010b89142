"""The objective registries: one record per method, looked up by `config.objective.name`.

Diffusion objectives (the `diffusion_rl` trainer, rft.train.diffusion_rl) and LM objectives
(the `lm_rl` trainer, rft.train.lm_rl) each register a record here; the loops dispatch on
what a record declares (its kind, its needs) and never on its name. A new method is a new
file that calls `register_diffusion(...)` or `register_lm(...)`; importing `rft.objectives`
registers the built-in ones.

Diffusion kinds, i.e. what an epoch does with its samples (`KINDS`):

* "trajectory": sample with per-step log-probs (stored latents, log-probs, conditions),
  score the final images, `prepare` adds per-sample host entries (advantages, per-step
  baselines, ...), then K updates score the stored transitions under θ. `make_loss(config)`
  returns a `TrajectoryLoss`: a per-step term (summed over steps, gradients accumulated
  one step at a time) or a coupled loss of all [n, T] log-probs (cotangent then step-wise
  vector-Jacobian products); rft.objectives.trajectory has both engines.
* "reward_backprop": no stored samples; each update draws fresh x_T and runs a
  differentiable rollout inside the loss, whose value is − mean reward of what it
  returns. `make_loss(config, sampler_kw)` returns
  `rollout(model_fn, params, x_T, cond, null, key, key_extra) -> (x, metrics)`, x [..., B,
  *latent] (extra leading dims are averaged by the reward).
* "select_sft": sample (no log-probs), `prepare` picks sample indices, and the updates
  minimise a supervised loss on the picked (image, condition) pairs. `make_loss(config,
  pipe)` returns `loss(params, batch, key, *, sampling_params, ref_params) -> (loss,
  metrics)` with batch keys "images", "cond", "null_cond" and any other per-pick entries
  `prepare` returned; sampling_params are the params that drew the samples, ref_params
  the frozen base.

A record with `sampling_decay(config, step) -> d` samples with its own lagged policy
θ_old (kept in the checkpoint; the loss receives it as sampling_params), moved after each
epoch as θ_old ← d θ_old + (1 − d) θ at optimizer step `step` (DiffusionNFT); without it
the current params sample.

`prepare(config, ids, scores, step_values, stats) -> (entries, metrics)` runs on the host
after the rewards: ids [n] prompt ids (B consecutive samples per prompt), scores [n],
step_values [n, T] (the reward of each step's x0 prediction when
config.objective.step_baseline asks for it, else None), stats the record's checkpointable
statistics (`make_stats(config, num_prompts)`, an object with state() / load_state(), or
None). Trajectory entries are per-sample arrays added to the batch; select_sft's entries
hold "keep" (flat sample indices) and optional per-kept-sample arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

KINDS = {
    "trajectory": "stored trajectories with per-step log-probs, scored under θ by the loss",
    "reward_backprop": "a differentiable rollout inside the loss, minus its reward",
    "select_sft": "a supervised denoising loss on samples picked by reward",
}


@dataclasses.dataclass(frozen=True)
class TrajectoryLoss:
  """The loss of a trajectory objective on a minibatch of stored samples.

  per_step=True:  fn(lp_j [n], j, batch) -> (loss_j, metrics); the loss is the mean of
                  the selected steps' terms (DDPO).
  per_step=False: fn(lp [n, T], batch) -> (loss, metrics), coupled over steps (PRDP).
  kl_coef (per_step only): adds kl_coef · mean_i KL_j(i), the sampler's step KL between
                  the trained and the frozen base params (`StepScorer.step_kl`, a
                  sampler with `step_kl`: Flow-GRPO's β).
  """
  per_step: bool
  fn: Callable
  kl_coef: float = 0.0


@dataclasses.dataclass(frozen=True)
class DiffusionObjective:
  """One diffusion reward-finetuning method (see the module docstring for the kinds).

  needs_ref_log_probs: the batch carries "ref_log_probs" [n, T] of the frozen base model.
  needs_groups: several samples per prompt (config.samples_per_prompt >= 2).
  differentiable_reward: the reward must be differentiable (gradients flow through it).
  check(config): raises ValueError naming the key for settings the method cannot run.
  rows_per_prompt(config) -> (rows, key): rows each prompt adds to an update batch
    (select_sft; the trajectory kind uses config.samples_per_prompt, reward_backprop 1).
  sampling_decay(config, step) -> d: sample with a lagged policy (module docstring).
  """
  name: str
  kind: str
  summary: str
  make_loss: Callable
  prepare: Callable | None = None
  make_stats: Callable | None = None
  check: Callable | None = None
  rows_per_prompt: Callable | None = None
  needs_ref_log_probs: bool = False
  needs_groups: bool = False
  differentiable_reward: bool = False
  sampling_decay: Callable | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"objective {self.name!r}: kind {self.kind!r} is not one of "
                       f"{sorted(KINDS)}")
    if self.kind != "reward_backprop" and self.prepare is None:
      raise ValueError(f"objective {self.name!r} of kind {self.kind!r} needs a prepare()")
    if self.sampling_decay is not None and self.kind != "select_sft":
      # (a trajectory objective's first update assumes θ drew its samples: ratio 1)
      raise ValueError(f"objective {self.name!r}: a lagged sampling policy is for the "
                       f"select_sft kind, not {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class LMObjective:
  """One LM reward-finetuning method on the `lm_rl` loop.

  settings(o) -> dict: the method's resolved settings from config.objective (e.g. the
    GRPO variant's clip, importance and aggregation); stored and passed back below.
  check(config): raises ValueError naming the key for settings the method cannot run.
  prepare(config, settings, rollout, group_size) -> (entries, metrics): per-completion
    host arrays for the update batch: "loss_weight" [N] (0 drops a completion) and
    whatever the loss reads (e.g. "advantages").
  loss(settings, log_probs [N, L], mask [N, L], batch) -> (loss, metrics); mask already
    carries loss_weight. batch holds "old_log_probs", "step_loss_tokens" (the loss-token
    count Σ completion_mask · loss_weight of the step's whole pass over its minibatches,
    all processes, in every row: dapo's divisor) and, with uses_reference,
    "ref_log_probs".
  uses_reference(settings): the loss needs the frozen base model's log-probs.
  dynamic_sampling(config): groups whose rewards all agree are dropped and refilled.
  label(config): the loss variant recorded in results.json ("loss").
  """
  name: str
  summary: str
  settings: Callable
  prepare: Callable
  loss: Callable
  check: Callable | None = None
  uses_reference: Callable = lambda settings: False
  dynamic_sampling: Callable = lambda config: False
  label: Callable = lambda config: ""


_DIFFUSION: dict[str, DiffusionObjective] = {}
_LM: dict[str, LMObjective] = {}


def _register(table: dict, record, replace: bool):
  if record.name in table and not replace:
    raise ValueError(f"objective {record.name!r} is already registered; pass replace=True "
                     f"to override it")
  table[record.name] = record
  return record


def register_diffusion(record: DiffusionObjective, replace: bool = False) -> DiffusionObjective:
  """Add a diffusion objective (usable as config.objective.name from then on)."""
  return _register(_DIFFUSION, record, replace)


def register_lm(record: LMObjective, replace: bool = False) -> LMObjective:
  """Add an LM objective (usable as config.objective.name of the lm_rl trainer)."""
  return _register(_LM, record, replace)


def _get(table: dict, name: str, what: str):
  if name not in table:
    raise ValueError(f"config.objective.name={name!r} is not a registered {what} objective; "
                     f"known: {sorted(table)}")
  return table[name]


def diffusion(name: str) -> DiffusionObjective:
  return _get(_DIFFUSION, name, "diffusion")


def lm(name: str) -> LMObjective:
  return _get(_LM, name, "LM")


def diffusion_names() -> list[str]:
  return sorted(_DIFFUSION)


def lm_names() -> list[str]:
  return sorted(_LM)


def unregister(name: str, lm_table: bool = False) -> None:
  """Remove a registered objective (tests register toy ones and clean up)."""
  (_LM if lm_table else _DIFFUSION).pop(name, None)
