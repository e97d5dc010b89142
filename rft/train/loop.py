"""Helpers every training loop shares (the loops stay explicit functions).

resume: restore the latest checkpoint into a target tree, with its metadata.
due: whether a periodic action (eval, checkpoint, log) falls on this step.
mean_metrics: per-key means of the metrics dicts of several updates (one device sync).
check_finite: stop on a non-finite loss, naming the last good checkpoint.
params_norm / check_diverged: stop when the trained parameters' norm blows up (finite but
  diverged, e.g. a huge learning rate), before the diverged state is checkpointed.
end_of_step: the step's checkpoint when due (metrics flushed first), then the stop check.
StopSignal / stop_if_signalled: SIGTERM (preemption, `kill`, SLURM's --signal) ends the run
  at the next step boundary with a checkpoint, flushed metrics and the command to resume.
write_results: results.json in the workdir (process 0 only).
apply_update: the optimizer step with the gradient, parameter and update norms and the
  learning rate it used.
eval_line: one readable console line per evaluation.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from absl import logging

from rft import paths


def resume(ckpt, target: Any, workdir: str, unit: str = "step") -> tuple[int, Any, dict]:
  """(start, restored tree or `target`, metadata): the latest checkpoint of `ckpt` restored
  into the structure of `target` (a mismatch is a clear error, never a silent restart),
  or (0, target, {}) when there is none."""
  latest = ckpt.latest_step()
  if latest is None:
    return 0, target, {}
  restored, meta = ckpt.restore(target)
  logging.info("resumed %s at %s %d", workdir, unit, latest)
  return int(latest), restored, meta or {}


def due(done: int, every: int, total: int) -> bool:
  """True every `every` steps (0: never) and at the last step."""
  return bool(every) and (done % every == 0 or done == total)


def mean_metrics(updates: list) -> dict:
  """{name: mean over the updates} of a list of (device) metrics dicts."""
  updates = jax.device_get(updates)
  return {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}


def _last_good(ckpt, workdir: str, unit: str, unsaved: bool) -> str:
  kept = f"nothing saved for this {unit}; " if unsaved else ""
  last = ckpt.latest_step()
  return kept + (f"last good checkpoint: {unit} {last} in {workdir}/checkpoints"
                 if last is not None else f"no checkpoint was written in {workdir}/checkpoints")


def check_finite(loss: float, where: str, ckpt, workdir: str, unit: str = "step",
                 unsaved: bool = True) -> None:
  """FloatingPointError naming `where` (e.g. "prdp loss at epoch 3") and the last good
  checkpoint when `loss` is NaN or infinite."""
  if np.isfinite(loss):
    return
  raise FloatingPointError(f"{where} is {loss}; {_last_good(ckpt, workdir, unit, unsaved)}")


_NORM = None


def params_norm(params) -> float:
  """‖params‖₂ over every leaf, computed in one jitted reduction (works on parameters
  sharded across devices and processes: every process calls it, each gets the value)."""
  global _NORM
  if _NORM is None:
    _NORM = jax.jit(lambda p: optax.global_norm(
        jax.tree.map(lambda x: x.astype(jax.numpy.float32), p)))
  return float(_NORM(params))


def check_diverged(param_norm: float, start_norm: float, max_ratio: float, where: str, ckpt,
                   workdir: str, unit: str = "step") -> None:
  """FloatingPointError when the trained parameters' norm (the update's `param_norm`
  metric) exceeds `max_ratio` times `start_norm`, their norm before training
  (config.max_param_norm_ratio; 0 turns the check off). Called before the checkpoint of
  the step, so a finite but diverged state (e.g. lr=1e30) is never saved or called good.
  A norm that overflowed to inf counts as diverged."""
  if not max_ratio or not start_norm > 0 or param_norm <= max_ratio * start_norm:
    return
  raise FloatingPointError(
      f"{where}: the trained parameters diverged (norm {param_norm:.4g}, "
      f"{param_norm / start_norm:.3g}x their starting norm {start_norm:.4g}; "
      f"--config.max_param_norm_ratio={max_ratio:g}); "
      f"{_last_good(ckpt, workdir, unit, True)}")


# SIGTERM is what schedulers send before killing a job (SLURM at the time limit or on
# preemption with --signal, Kubernetes, `kill`); the process then has a grace period.
STOP_SIGNALS = (signal.SIGTERM,)
STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: what a scheduler expects from a terminated job


class StopSignal:
  """Turns SIGTERM into a request to stop at the next step boundary.

  The handler only records the signal; the loop asks `requested()` once per step (an
  epoch for the diffusion loop), after the step's metrics are written, and then ends the
  run through `stop_if_signalled`. With several processes the request is agreed on
  (any process signalled -> all stop at the same step), so no process is left waiting
  in a collective. Installed only in the main thread; `close()` restores the previous
  handlers.
  """

  def __init__(self, signals=STOP_SIGNALS):
    self.received: Optional[int] = None
    self._previous = {}
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is None:
      logging.warning("received %s: stopping after this step with a checkpoint",
                      signal.Signals(signum).name)
    self.received = signum

  def requested(self) -> bool:
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def close(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}


class Stopped(SystemExit):
  """The run ended early on a stop signal, after writing a checkpoint (exit status 143)."""


def resume_command() -> str:
  """The command line that started this process (the same command resumes a run)."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join("rft", "main.py")):
    argv = ["-m", "rft.main"] + argv[1:]
  return " ".join(shlex.quote(a) for a in ["python"] + argv)


def end_of_step(stop: "StopSignal", done: int, total: int, ckpt_every: int,
                save: Callable[[], Any], writer, workdir: str, unit: str = "step") -> None:
  """What every loop does after step `done`: write its checkpoint when due (every
  `ckpt_every` steps and at the last), the metrics flushed first so the step's points are
  on disk with it; then end the run here if a stop signal came (`stop_if_signalled`)."""
  def flushed_save():
    writer.flush()
    save()

  saved = due(done, ckpt_every, total) or done == total
  if saved:
    flushed_save()
  stop_if_signalled(stop, done, unit, saved, flushed_save, writer, workdir)


def stop_if_signalled(stop: "StopSignal", done: int, unit: str, saved: bool,
                      save: Callable[[], Any], writer, workdir: str) -> None:
  """If a stop was requested: write the checkpoint of step `done` unless `saved`,
  flush the metrics, log one line naming the checkpoint and the command to resume, and
  raise `Stopped` (exit status 143; the same command resumes the run, so a requeueing
  scheduler needs nothing else)."""
  if not stop.requested():
    return
  if not saved:
    save()
  writer.flush()
  name = signal.Signals(stop.received).name if stop.received else "a stop signal"
  msg = (f"stopped by {name} after {unit} {done}: checkpoint {unit} {done} in "
         f"{workdir}/checkpoints; resume with: {resume_command()}")
  logging.warning("%s", msg)
  print(msg, file=sys.stderr, flush=True)
  raise Stopped(STOPPED_EXIT_CODE)


def write_results(workdir: str, results: dict) -> None:
  """<workdir>/results.json (process 0 only; the others return)."""
  if jax.process_index() != 0:
    return
  paths.write_json(os.path.join(workdir, "results.json"), results, indent=1)


def apply_update(state, grads, tx, metrics: dict, *args, lr: Optional[Callable] = None):
  """(new state, metrics + grad_norm, param_norm and update_norm [+ lr]): one optimizer
  step (`state.apply_gradients(grads, tx, *args)`) inside a jitted update. The update norm
  ‖θ_new − θ‖ beside the gradient norm shows what the optimizer actually did (Adam's
  steps stay near lr per coordinate whatever the gradient's scale).

  `lr`: the optimizer's schedule (rft.train.state.lr_schedule); the metrics then hold
  `lr(state.step)`, the learning rate of this update (optax counts updates from 0, as
  TrainState.step does)."""
  new = state.apply_gradients(grads, tx, *args)
  delta = jax.tree.map(lambda a, b: a.astype(jax.numpy.float32) - b.astype(jax.numpy.float32),
                       new.params, state.params)
  out = dict(metrics, grad_norm=optax.global_norm(grads),
             param_norm=optax.global_norm(new.params),
             update_norm=optax.global_norm(delta))
  if lr is not None:
    out["lr"] = jax.numpy.asarray(lr(state.step), jax.numpy.float32)
  return new, out


SPLIT_WORDS = {"train": "seen", "heldout": "unseen"}


def eval_line(unit: str, done: int, results: dict, fields) -> str:
  """One console line for an evaluation, e.g.
  ``epoch 10  reward seen 0.612 unseen 0.480  alignment seen 70.3 % unseen 48.1 %``.

  `results`: {"<split>/<name>": value}; `fields`: (label, name, kind) triples, kind "%"
  (a fraction shown as a percentage, one decimal) or "f" (three decimals). Each field
  shows the splits that have a value, train as "seen" and heldout as "unseen"; a field
  no split has is left out.
  """
  splits = sorted({k.split("/", 1)[0] for k in results if "/" in k},
                  key=lambda s: (s not in SPLIT_WORDS, list(SPLIT_WORDS).index(s)
                                 if s in SPLIT_WORDS else 0, s))
  parts = [f"{unit} {done}"]
  for label, name, kind in fields:
    vals = []
    for split in splits:
      v = results.get(f"{split}/{name}")
      if v is None:
        continue
      v = float(v)
      shown = f"{100 * v:.1f} %" if kind == "%" else f"{v:.3f}"
      vals.append(f"{SPLIT_WORDS.get(split, split)} {shown}")
    if vals:
      parts.append(f"{label} " + " ".join(vals))
  return "  ".join(parts)
