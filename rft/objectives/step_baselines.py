"""Per-step baselines for score-function objectives on denoising chains (PRDP, DDPO).

Every trajectory objective's on-policy gradient is a score-function estimator

    ∇J = E[ Σ_t A · ∇θ log πθ(x_{t−1} | x_t) ],

with one advantage A (a reward minus a group or prompt baseline) given to all T steps.
Any baseline b_t that is a function of the step's input x_t alone may be subtracted from
step t's reward without changing the expectation, because E[∇ log πθ(x_{t−1} | x_t) | x_t]
= 0 (Williams 1992; Greensmith, Bartlett & Baxter 2004). The variance-optimal choice is
close to the value E[r | x_t]; then a step whose noise no longer changes the outcome
gets a reward ≈ 0 and contributes ≈ 0 noise.

`x0_reward` (the one implemented): b_t = r(x̂0(x_t)), the reward of the sampler's own
x0 prediction at x_t, recorded during the rollout (no extra denoiser call; one extra
reward evaluation per step). On ShapesWorld's base model the correlation of b_t with the
final reward rises from 0.26 at the first of 10 steps to 0.90 at the fifth and 1.00 at
the last (10 x 512 rollouts with shared initial noise, `python -m rft.tools.noise_scale
--config=prdp --estimates 10 --prompts 64 --set share_initial_noise=true --set
objective.step_baseline=x0_reward`), so the late steps' reward differences nearly vanish.

`baseline_lambda` λ (GAE, Schulman et al. 2016) mixes in the later steps' baselines:
with δ_t = b_{t+1} − b_t (b_T = r, the final reward) the step-t reward becomes
A_t = Σ_{k≥t} λ^{k−t} δ_k. λ = 1 gives r − b_t (unbiased, above); λ = 0 gives
b_{t+1} − b_t, the change of the x0-prediction's reward over the step (a dense per-step
reward): step t is then no longer charged with the noise of the steps after it, at the
price of a bias, since b_{t+1} is not E[r | x_{t+1}] exactly. Objectives get it as an
effective baseline b'_t = r − A_t (`lambda_baselines`), a function of x_t and later.

How the objectives use b [n, T]:
* PRDP (rft.objectives.prdp, `step_baselines=`): the pair term's reward difference at
  step t becomes (r(a) − b_t(a)) − (r(b) − b_t(b)).
* DDPO (`step_advantages`): A_{i,t} = A_i − (b_t(i) − mean of b_t over i's group) / s_i,
  with s_i the scale that normalised A_i (the prompt's reward std), so the baseline is
  in the advantage's units.
"""
from __future__ import annotations

import numpy as np

KINDS = ("none", "x0_reward")


def check_kind(kind: str, key: str = "config.objective.step_baseline") -> str:
  if kind not in KINDS:
    raise ValueError(f"{key}={kind!r}; known: {list(KINDS)}")
  return kind


def group_centered(values: np.ndarray, group_size: int) -> np.ndarray:
  """values [n, T] minus the mean over each run of `group_size` consecutive rows."""
  v = np.asarray(values, np.float32)
  n, T = v.shape
  if n % group_size:
    raise ValueError(f"{n} rows are not whole groups of {group_size}")
  g = v.reshape(-1, group_size, T)
  return (g - g.mean(1, keepdims=True)).reshape(n, T)


def step_advantages(advantages: np.ndarray, scale: np.ndarray, values: np.ndarray,
                    group_size: int) -> np.ndarray:
  """[n, T] per-step advantages A_i − (b_t(i) − group mean of b_t) / s_i (DDPO)."""
  adv = np.asarray(advantages, np.float32)
  s = np.asarray(scale, np.float32)
  return adv[:, None] - group_centered(values, group_size) / s[:, None]


def value_correlation(rewards: np.ndarray, values: np.ndarray) -> np.ndarray:
  """[T] Pearson correlation of each step's baseline with the final reward (a diagnostic:
  the fraction of reward variance a step's baseline removes is about its square)."""
  r = np.asarray(rewards, np.float64)
  v = np.asarray(values, np.float64)
  rc, vc = r - r.mean(), v - v.mean(0)
  den = np.sqrt((rc ** 2).sum() * (vc ** 2).sum(0))
  return np.where(den > 0, (rc[:, None] * vc).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def lambda_baselines(rewards: np.ndarray, values: np.ndarray, lam: float) -> np.ndarray:
  """Effective baselines b'_t = r − A_t with A_t = Σ_{k≥t} λ^{k−t} (b_{k+1} − b_k), b_T = r.

  rewards [n], values b [n, T] (b_t at each step's input). λ = 1 returns b itself.
  """
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"config.objective.baseline_lambda={lam}; use a value in [0, 1]")
  r = np.asarray(rewards, np.float64)
  b = np.asarray(values, np.float64)
  if lam == 1.0:
    return b.astype(np.float32)
  nxt = np.concatenate([b[:, 1:], r[:, None]], axis=1)
  delta = nxt - b
  adv = np.zeros_like(b)
  acc = np.zeros_like(r)
  for t in range(b.shape[1] - 1, -1, -1):
    acc = delta[:, t] + lam * acc
    adv[:, t] = acc
  return (r[:, None] - adv).astype(np.float32)
