"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL")
and DanceGRPO's settings (Xue et al. 2025), on the flow SDE sampler (rft.diffusion.flow).

Each prompt's samples form a group; with rewards r, a sample's advantage is

    A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4)        (std over the batch with
                                                                 global_std, as the
                                                                 reference code allows)

clipped to ±adv_clip_max, and every recorded SDE step t gets the PPO-clip surrogate

    L = mean_{i,t} max(−A_i ρ_t(i), −A_i clip(ρ_t(i), 1 − ε, 1 + ε)),  ρ = π_θ / π_θold,

on a random `timestep_fraction` of the steps (Flow-GRPO-Fast / DanceGRPO's timestep
subset), plus the paper's KL penalty β·KL_t with β = `kl_coef` (0: Flow-GRPO-Fast and
DanceGRPO), in the reference code's closed form between the step means of the trained
model and the frozen base (`FlowSampler.step_kl`):

    KL_t = mean_dims (μ_θ(x_t) − μ_ref(x_t))² / 2 s_t²,   s_t = a·sqrt(σ_t / (1 − σ_t))

(the SDE step's std is s_t·sqrt(−dt); CPS uses s_t = σ_{t−1}·sin(aπ/2)). It costs one
extra forward pass of the reference per trained step. DanceGRPO's other setting is a
loop option: one shared x_T per group (`config.share_initial_noise`).
"""
from __future__ import annotations

import dataclasses

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
  o = config.objective
  return dataclasses.replace(ddpo.trajectory_loss(o.clip_range, o.adv_clip_max),
                             kl_coef=float(o.kl_coef))


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
  if not (o.kl_coef >= 0):
    raise ValueError(f"config.objective.kl_coef={o.kl_coef}: must be >= 0 (the paper's β)")
  if o.kl_coef and config.sampler.eta == 0:
    raise ValueError("config.objective.kl_coef > 0 needs a stochastic sampler: "
                     f"config.sampler.eta={config.sampler.eta}")
  if not config.sampler.name.startswith("flow"):
    raise ValueError(f"config.sampler.name={config.sampler.name!r}: flow_grpo trains the flow "
                     "SDE ('flow' or 'flow_cps') of a flow base (config.base_dir)")


registry.register_diffusion(registry.DiffusionObjective(
    name="flow_grpo", kind="trajectory",
    summary="group-normalised advantages, PPO clip per flow-SDE step (Liu et al. 2025)",
    make_loss=_make_loss, prepare=_prepare, check=_check, needs_groups=True))
