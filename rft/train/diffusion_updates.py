"""The jitted updates of the diffusion loop (rft.train.diffusion_rl), one per objective
kind: trajectory (stored rollouts, step-wise gradients), reward_backprop (a fresh
differentiable rollout inside the loss) and select_sft (supervised on kept samples), and
the constant-after-warmup learning-rate schedule they report.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rft.diffusion.sampling import SamplerConfig
from rft.objectives import draft as draft_lib
from rft.objectives import registry, trajectory
from rft.placement import Placement
from rft.train import loop
from rft.train.state import lr_schedule


def total_updates(config) -> int:
  """Optimizer updates of the whole run (the length of the lr schedule)."""
  return config.epochs * max(config.updates_per_epoch, 1)


def lr_of(config):
  """The optimizer's learning-rate schedule (update count -> lr): constant after a linear
  warmup of config.warmup updates (rft.train.state.lr_schedule)."""
  return lr_schedule(config.lr, total_updates(config), config.warmup, "constant")



def _jit(update, placement, state, base, num_args, **kw):
  """The update jitted: as is (shardings inferred from the arguments), or with the state's
  and the frozen base params' shardings fixed in and out (`Placement.jit_update`)."""
  if placement is None:
    return jax.jit(update, donate_argnums=(0,), **kw)
  return placement.jit_update(update, state, frozen=((1, base),), num_args=num_args, **kw)


def make_trajectory_update(config, scorer: trajectory.StepScorer, loss: registry.TrajectoryLoss,
                           materialize, tx, placement: Placement | None = None, state=None,
                           base=None):
  """update(state, base, batch, key, on_policy) of a trajectory objective's loss on stored
  trajectories (step-wise gradients, rft.objectives.trajectory).

  With `placement` (and the placed `state` and `base` whose layout it fixes) the jit has
  explicit in / out shardings; without, they are inferred from the arguments.
  """
  o = config.objective
  unroll = trajectory.auto_unroll(config.unroll)

  def grads_fn(trainable, mat, b, key, on_policy, ref):
    if loss.per_step:
      return trajectory.separable_grads(scorer, mat, trainable, b, loss.fn, key,
                                        timestep_fraction=o.timestep_fraction,
                                        skip_last=o.skip_last_steps, unroll=unroll,
                                        kl_coef=loss.kl_coef, ref_params=ref,
                                        steps=b.get("train_steps"))
    return trajectory.coupled_grads(scorer, mat, trainable, b, loss.fn, key,
                                    timestep_fraction=o.timestep_fraction,
                                    log_probs=b["log_probs"] if on_policy else None,
                                    skip_last=o.skip_last_steps, unroll=unroll,
                                    steps=b.get("train_steps"))

  def update(state, base, b, key, on_policy):
    mat = lambda tr: materialize(tr, base)
    # The reference of a step KL is the frozen base (full finetuning overlays the trained
    # leaves on it; LoRA merges adapters into it).
    value, m, grads = grads_fn(state.params, mat, b, key, on_policy, base)
    return loop.apply_update(state, grads, tx, dict(m, loss=value), config.ema_decay,
                             lr=lr_of(config))

  return _jit(update, placement, state, base, 4, static_argnames=("on_policy",))


def make_backprop_update(config, pipe, sampler: SamplerConfig, reward, rollout, materialize, tx,
                         placement: Placement | None = None, state=None, base=None):
  """update(state, base, b, key, reward_params) of a reward_backprop objective: fresh x_T,
  the objective's differentiable `rollout`, loss − mean reward. The reward's frozen
  weights come in as an argument.

  Latents are decoded with the frozen base params (e.g. the VAE): gradients reach the
  trained params through the decoder, never the decoder's own params.
  """

  def loss_fn(trainable, base, b, key, reward_params):
    params = materialize(trainable, base)
    k_init, k_chain, k_extra = jax.random.split(key, 3)
    x_T = jax.random.normal(k_init, (b["tokens"].shape[0], *pipe.sample_shape), jnp.float32)
    decoded_reward = lambda latents, prompts: reward(pipe.images(base, latents), prompts,
                                                     reward_params)
    x, m_extra = rollout(pipe.model_fn, params, x_T, b["cond"], b["null_cond"], k_chain, k_extra)
    loss, m = draft_lib.reward_loss(decoded_reward, x, b["prompts"])
    return loss, dict(m, **m_extra)

  def update(state, base, b, key, reward_params):
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, base, b, key,
                                                                 reward_params)
    return loop.apply_update(state, grads, tx, dict(m, loss=loss), config.ema_decay,
                             lr=lr_of(config))

  return _jit(update, placement, state, base, 5)


def make_sft_update(config, loss, materialize, tx, placement: Placement | None = None,
                    state=None, base=None):
  """update(state, base, b, key, sampling) of a select_sft objective's supervised `loss`;
  `sampling` holds the trainable leaves that drew the samples (a lagged policy's, or
  the current ones)."""

  def update(state, base, b, key, sampling):
    def loss_fn(trainable):
      return loss(materialize(trainable, base), b, key,
                  sampling_params=materialize(sampling, base), ref_params=base)

    (value, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loop.apply_update(state, grads, tx, dict(m, loss=value), config.ema_decay,
                             lr=lr_of(config))

  return _jit(update, placement, state, base, 5)


def sampler_kwargs(step_sampler, sampler: SamplerConfig) -> dict:
  """The rollout settings a reward_backprop objective's differentiable rollout takes
  (the keywords of rft.diffusion.sampling.truncated_rollout besides the truncation):
  the run's built sampler and the configured steps and guidance scale."""
  return dict(sampler=step_sampler, num_steps=sampler.num_steps,
              guidance_scale=sampler.guidance_scale)

