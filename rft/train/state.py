"""Train state and optimizer shared by the training programs."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any = None  # None when EMA is off

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, ema: bool = False):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params) if ema else None)

  def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None:
      ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def make_optimizer(lr: float, steps: int, warmup: int = 0, weight_decay: float = 0.0,
                   grad_clip: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   schedule: str = "cosine", eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay (or constant), optional global-norm clip."""
  if schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                               end_value=lr * 0.05)
  elif schedule == "constant":  # (warmup 0: the first update already uses lr)
    sched = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                   optax.constant_schedule(lr)], [warmup])
             if warmup > 0 else optax.constant_schedule(lr))
  else:
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'constant'")
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)
