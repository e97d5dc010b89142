"""DDPO (Black et al., ICLR 2024, "Training Diffusion Models with Reinforcement Learning").

The denoising chain is an MDP whose actions are the sampler's transitions; the reward
of the final image is given to every step. With advantages A (rewards normalised per
prompt, clipped to ±adv_clip_max) and per-step log-probs lp_t:

* DDPO_SF (score function, REINFORCE):   L = − mean_{i,t} A_i · lp_t(i)
* DDPO_IS (importance sampled, PPO clip): ρ = exp(lp_t − lp_t^old),
      L = mean_{i,t} max(−A_i ρ, −A_i clip(ρ, 1 − ε, 1 + ε))

The mean over steps runs over a random `timestep_fraction` of the T steps per update,
the gradient being accumulated step by step (rft.objectives.trajectory).

Per-prompt statistics (the paper's Sec. 4.3 / reference code's PerPromptStatTracker):
each prompt keeps a buffer of its last `buffer_size` rewards; once it holds at least
`min_count`, advantages are (r − mean_prompt) / (std_prompt + 1e-6), before that the
current batch's mean and std are used. The tracker is plain arrays, so it checkpoints.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rft.objectives import registry, step_baselines


def ddpo_step_loss(log_probs: jnp.ndarray, old_log_probs: jnp.ndarray, advantages: jnp.ndarray,
                   *, clip_range: float, adv_clip_max: float, importance_sampling: bool = True):
  """DDPO loss of one denoising step for n samples: (scalar, metrics).

  log_probs, old_log_probs, advantages: [n] (advantages of this step: the sample's, or
  its per-step advantage with a step baseline, rft.objectives.step_baselines).
  """
  f32 = jnp.float32
  adv = jnp.clip(advantages.astype(f32), -adv_clip_max, adv_clip_max)
  diff = log_probs.astype(f32) - old_log_probs.astype(f32)
  ratio = jnp.exp(diff)
  if importance_sampling:
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.mean(jnp.maximum(unclipped, clipped))
  else:
    loss = -jnp.mean(adv * log_probs.astype(f32))
  metrics = {
      "loss": loss,
      "approx_kl": 0.5 * jnp.mean(jnp.square(diff)),
      "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(f32)),
      "ratio": jnp.mean(ratio),
  }
  return loss, metrics


class PerPromptStatTracker:
  """Reward buffers per prompt id, stored as arrays: values [P, buffer_size], count [P]."""

  def __init__(self, num_prompts: int, buffer_size: int, min_count: int):
    if min_count > buffer_size:
      raise ValueError(f"min_count={min_count} exceeds buffer_size={buffer_size}")
    self.buffer_size, self.min_count = buffer_size, min_count
    self.values = np.zeros((num_prompts, buffer_size), np.float32)
    self.count = np.zeros((num_prompts,), np.int64)  # rewards ever seen (ring position)

  def state(self) -> dict:
    return {"values": self.values.copy(), "count": self.count.copy()}

  def load_state(self, state: dict):
    values, count = np.asarray(state["values"]), np.asarray(state["count"])
    if values.shape != self.values.shape or count.shape != self.count.shape:
      raise ValueError(f"stat tracker state has shapes {values.shape}, {count.shape}; expected "
                       f"{self.values.shape}, {self.count.shape} (num_prompts, buffer_size)")
    self.values, self.count = values.astype(np.float32), count.astype(np.int64)

  def update(self, prompt_ids: np.ndarray, rewards: np.ndarray, with_scale: bool = False):
    """Add this batch's rewards, return the advantages [n] (float32); with_scale also
    the divisor std + 1e-6 each advantage was normalised by."""
    prompt_ids = np.asarray(prompt_ids)
    rewards = np.asarray(rewards, np.float32)
    adv = np.zeros_like(rewards)
    scale = np.zeros_like(rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std()
    for p in np.unique(prompt_ids):
      sel = prompt_ids == p
      for r in rewards[sel]:
        self.values[p, self.count[p] % self.buffer_size] = r
        self.count[p] += 1
      held = self.values[p, :min(self.count[p], self.buffer_size)]
      if len(held) < self.min_count:
        mean, std = batch_mean, batch_std
      else:
        mean, std = held.mean(), held.std()
      adv[sel] = (rewards[sel] - mean) / (std + 1e-6)
      scale[sel] = std + 1e-6
    return (adv, scale) if with_scale else adv

  def stats(self) -> dict:
    seen = self.count > 0
    return {"prompts_seen": int(seen.sum()),
            "mean_count": float(np.minimum(self.count[seen], self.buffer_size).mean())
            if seen.any() else 0.0}


def batch_advantages(rewards: np.ndarray, with_scale: bool = False):
  """(r − mean) / (std + 1e-6) over the whole batch (DDPO without per-prompt tracking);
  with_scale also the divisor, per sample."""
  rewards = np.asarray(rewards, np.float32)
  scale = rewards.std() + 1e-6
  adv = (rewards - rewards.mean()) / scale
  return (adv, np.full_like(rewards, scale)) if with_scale else adv


# ------------------------------------------------------------------------ registration


def trajectory_loss(clip_range: float, adv_clip_max: float,
                    importance_sampling: bool = True) -> registry.TrajectoryLoss:
  """`ddpo_step_loss` per step over a batch with "advantages" ([n], or [n, T] with a step
  baseline) and the sampler's "log_probs" [n, T] (also Flow-GRPO's loss)."""

  def step_loss(lp_j, j, b):
    adv = b["advantages"]
    if adv.ndim == 2:  # per-step advantages (a step baseline)
      adv = jnp.take(adv, j, axis=1)
    return ddpo_step_loss(lp_j, jnp.take(b["log_probs"], j, axis=1), adv,
                          clip_range=clip_range, adv_clip_max=adv_clip_max,
                          importance_sampling=importance_sampling)

  return registry.TrajectoryLoss(per_step=True, fn=step_loss)


def _make_loss(config) -> registry.TrajectoryLoss:
  o = config.objective
  return trajectory_loss(o.clip_range, o.adv_clip_max, o.importance_sampling)


def _make_stats(config, num_prompts: int):
  o = config.objective
  return PerPromptStatTracker(num_prompts, o.buffer_size, o.min_count) if o.per_prompt_stats \
      else None


def _prepare(config, ids, scores, step_values, tracker):
  adv, scale = (tracker.update(ids, scores, with_scale=True) if tracker
                else batch_advantages(scores, with_scale=True))
  if step_values is not None:
    adv = step_baselines.step_advantages(adv, scale, step_values, config.samples_per_prompt)
  return {"advantages": np.asarray(adv, np.float32)}, {}


registry.register_diffusion(registry.DiffusionObjective(
    name="ddpo", kind="trajectory",
    summary="PPO-clip or score-function surrogate per denoising step (Black et al. 2024)",
    make_loss=_make_loss, prepare=_prepare, make_stats=_make_stats))
