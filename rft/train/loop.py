"""Helpers every training loop shares (the loops stay explicit functions).

resume: restore the latest checkpoint into a target tree, with its metadata.
due: whether a periodic action (eval, checkpoint, log) falls on this step.
mean_metrics: per-key means of the metrics dicts of several updates (one device sync).
check_finite: stop on a non-finite loss, naming the last good checkpoint.
write_results: results.json in the workdir (process 0 only).
apply_update: the optimizer step with the gradient, parameter and update norms.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import optax
from absl import logging


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


def check_finite(loss: float, where: str, ckpt, workdir: str, unit: str = "step",
                 unsaved: bool = True) -> None:
  """FloatingPointError naming `where` (e.g. "prdp loss at epoch 3") and the last good
  checkpoint when `loss` is NaN or infinite."""
  if np.isfinite(loss):
    return
  kept = f"nothing saved for this {unit}; " if unsaved else ""
  last = ckpt.latest_step()
  good = (f"last good checkpoint: {unit} {last} in {workdir}/checkpoints" if last is not None
          else f"no checkpoint was written in {workdir}/checkpoints")
  raise FloatingPointError(f"{where} is {loss}; {kept}{good}")


def write_results(workdir: str, results: dict) -> None:
  """<workdir>/results.json (process 0 only; the others return)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def apply_update(state, grads, tx, metrics: dict, *args):
  """(new state, metrics + grad_norm, param_norm and update_norm): one optimizer step
  (`state.apply_gradients(grads, tx, *args)`) inside a jitted update. The update norm
  ‖θ_new − θ‖ beside the gradient norm shows what the optimizer actually did (Adam's
  steps stay near lr per coordinate whatever the gradient's scale)."""
  new = state.apply_gradients(grads, tx, *args)
  delta = jax.tree.map(lambda a, b: a.astype(jax.numpy.float32) - b.astype(jax.numpy.float32),
                       new.params, state.params)
  return new, dict(metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(new.params),
                   update_norm=optax.global_norm(delta))
