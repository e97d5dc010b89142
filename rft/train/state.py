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


def lr_schedule(lr: float, steps: int, warmup: int = 0, schedule: str = "cosine"):
  """The optax learning-rate schedule make_optimizer uses: update `count` (0 for the first
  update) -> learning rate.

  "cosine": linear warmup 0 -> lr over max(warmup, 1) updates, then cosine decay to
  0.05 lr at update max(steps, warmup + 1). "constant": lr * count / warmup during the
  warmup, then lr (warmup 0: the first update already uses lr).
  """
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                              end_value=lr * 0.05)
  if schedule == "constant":
    return (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                  optax.constant_schedule(lr)], [warmup])
            if warmup > 0 else optax.constant_schedule(lr))
  raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'constant'")


def make_optimizer(lr: float, steps: int, warmup: int = 0, weight_decay: float = 0.0,
                   grad_clip: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   schedule: str = "cosine", eps: float = 1e-8, name: str = "adamw"
                   ) -> optax.GradientTransformation:
  """AdamW (or SGD) with linear warmup then cosine decay (or constant), optional global-norm
  clip.

  name "sgd": decoupled weight decay, then SGD with momentum b1 (0: none). Unlike Adam,
  which moves every coordinate by about lr, SGD moves each coordinate in proportion to
  its gradient. On ShapesWorld PRDP that concentrates the update on a few layers
  (conv_out) and broke the model at lr 3e-3 and 1e-2 (README method-table notes), so
  the online configs keep "adamw".
  """
  sched = lr_schedule(lr, steps, warmup, schedule)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  if name == "adamw":
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  elif name == "sgd":
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(sched, momentum=b1 or None))
  else:
    raise ValueError(f"unknown optimizer {name!r} (config.optimizer); use 'adamw' or 'sgd'")
  return optax.chain(*parts)
