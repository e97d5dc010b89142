"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL")
and DanceGRPO's settings (Xue et al. 2025), on the flow SDE sampler (rft.diffusion.flow).

Each prompt's samples form a group; with rewards r, a sample's advantage is

    A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4)        (std over the batch with
                                                                 global_std, as the
                                                                 reference code allows)

clipped to ±adv_clip_max, and every recorded SDE step t gets the PPO-clip surrogate

    L = mean_{i,t} max(−A_i ρ_t(i), −A_i clip(ρ_t(i), 1 − ε, 1 + ε)),  ρ = π_θ / π_θold,

on a random `timestep_fraction` of the steps (Flow-GRPO-Fast / DanceGRPO's timestep
subset). DanceGRPO's other settings are loop options: one shared x_T per group
(`config.share_initial_noise`), no KL. The paper's KL term β·KL(π_θ || π_ref) between the
step Gaussians (closed form: ‖μ_θ − μ_ref‖² / 2σ_t²) is not implemented: `kl_coef` must
be 0 (the setting Flow-GRPO-Fast and DanceGRPO use).
"""
from __future__ import annotations

import numpy as np

from rft.objectives import ddpo, registry, step_baselines


def group_advantages(ids, rewards, global_std: bool = False, eps: float = 1e-4):
  """(advantages [n], divisor [n]) of rewards grouped by prompt id (any order): the
  group's mean is subtracted; the divisor is the group's population std (or the whole
  batch's with global_std) + eps."""
  ids = np.asarray(ids)
  r = np.asarray(rewards, np.float64)
  adv, scale = np.zeros_like(r), np.zeros_like(r)
  batch_std = r.std()
  for p in np.unique(ids):
    sel = ids == p
    s = (batch_std if global_std else r[sel].std()) + eps
    adv[sel] = (r[sel] - r[sel].mean()) / s
    scale[sel] = s
  return adv.astype(np.float32), scale.astype(np.float32)


def _make_loss(config) -> registry.TrajectoryLoss:
  return ddpo.trajectory_loss(config.objective.clip_range, config.objective.adv_clip_max)


def _prepare(config, ids, scores, step_values, stats):
  del stats
  adv, scale = group_advantages(ids, scores, config.objective.global_std)
  if step_values is not None:
    adv = step_baselines.step_advantages(adv, scale, step_values, config.samples_per_prompt)
  zero = float(np.mean([np.ptp(np.asarray(scores)[np.asarray(ids) == p]) == 0
                        for p in np.unique(ids)]))
  return {"advantages": np.asarray(adv, np.float32)}, {"groups_without_variance": zero}


def _check(config):
  o = config.objective
  if o.kl_coef:
    raise ValueError(f"config.objective.kl_coef={o.kl_coef}: Flow-GRPO's closed-form step KL "
                     "is not implemented; use 0 (Flow-GRPO-Fast / DanceGRPO)")
  if not config.sampler.name.startswith("flow"):
    raise ValueError(f"config.sampler.name={config.sampler.name!r}: flow_grpo trains the flow "
                     "SDE ('flow' or 'flow_cps') of a flow base (config.base_dir)")


registry.register_diffusion(registry.DiffusionObjective(
    name="flow_grpo", kind="trajectory",
    summary="group-normalised advantages, PPO clip per flow-SDE step (Liu et al. 2025)",
    make_loss=_make_loss, prepare=_prepare, check=_check, needs_groups=True))
