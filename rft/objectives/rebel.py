"""REBEL for LMs: regress relative rewards with sequence log-ratios to the sampling policy.

Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards" (the
LM form of PRDP's reward difference prediction). For two completions y, y' of prompt x,
drawn from the policy π_old of this step (θ_old, which also holds the old log-probs):

    ℓ(y, y') = ( (1/η) [ ln π_θ(y|x)/π_old(y|x) − ln π_θ(y'|x)/π_old(y'|x) ] − (r(y) − r(y')) )²

with ln π(y|x) = Σ_t ln π(y_t | x, y_<t) over the completion's tokens, and
L = the mean of ℓ over the pairs of every group (rft.objectives.lm_pairs: "all" pairs
i < j, or "consecutive" (0, 1), (2, 3), ...). Each step is one mirror-descent update
π_{t+1} ∝ π_t · exp(η r) solved by least squares; the reference code (ZhaolinGao/REBEL,
src/tldr/rebel.py) draws 2 completions per prompt, sums the token log-probs over the
completion and minimises (Δ ln π/π_old − η Δr)², i.e. η² ℓ: the same minimiser, a constant
factor on the gradient. Its default η is 1.

KL to the reference (objective.beta > 0, as the reference code's kl_coef): the reward is
r(y) − β Σ_t (ln π_old(y_t) − ln π_ref(y_t)), a constant of the update (π_old and π_ref
are fixed within a step).

At θ = θ_old the gradient is −(2/η) mean_pairs (r(y) − r(y')) ∇(ln π(y) − ln π(y')): a
policy gradient in which each completion's baseline is its partner's reward.
"""
from __future__ import annotations

from rft.objectives import lm_pairs, registry


def rebel_loss(log_probs, old_log_probs, mask, rewards, pair_group, valid, *, eta: float,
               ref_log_probs=None, beta: float = 0.0):
  """REBEL loss (scalar) and metrics (module docstring).

  log_probs / old_log_probs (/ ref_log_probs): [n, L] token log-probs under θ, the
  sampling policy θ_old (and π_ref, read when beta > 0); mask [n, L] (completion mask ×
  loss weight); rewards [n]; pair_group [n] (rows pair within equal ids); valid [n] bool
  (rows that may be paired).
  """
  if eta <= 0:
    raise ValueError(f"REBEL needs eta > 0, got {eta}")
  seq_ratio = lm_pairs.sequence_sum(log_probs - old_log_probs, mask)  # ln π_θ(y)/π_old(y)
  r = rewards
  metrics = {}
  if beta:
    if ref_log_probs is None:
      raise ValueError(f"beta={beta} needs ref_log_probs")
    kl = lm_pairs.sequence_sum(old_log_probs - ref_log_probs, mask)  # ln π_old(y)/π_ref(y)
    r = r - beta * kl
    metrics["kl_sequence"] = kl.mean()
  loss, m = lm_pairs.pair_regression(seq_ratio / eta, r, pair_group, valid)
  metrics.update(m, loss=loss, ratio_mean=lm_pairs.ratio_mean(log_probs, old_log_probs, mask))
  return loss, metrics


def _check(config):
  lm_pairs.check(config, "rebel")
  if config.objective.eta <= 0:
    raise ValueError(f"config.objective.eta={config.objective.eta}: REBEL's step size "
                     f"(the log-ratio difference is divided by it) must be > 0")


def _loss(kw, log_probs, mask, batch):
  return rebel_loss(log_probs, batch["old_log_probs"], mask, batch["rewards"],
                    batch["pair_group"], batch["loss_weight"] > 0, eta=kw["eta"],
                    ref_log_probs=batch.get("ref_log_probs"), beta=kw["beta"])


registry.register_lm(registry.LMObjective(
    name="rebel", summary="least squares of sequence log-ratio differences (1/η, to θ_old) "
                          "onto reward differences of pairs (Gao et al. 2024)",
    settings=lambda o: {"eta": float(o.eta), "beta": float(o.beta), "pairs": o.pairs},
    check=_check, prepare=lm_pairs.prepare, loss=_loss,
    uses_reference=lambda kw: kw["beta"] > 0,
    label=lambda config: f"{config.objective.pairs}_pairs"))
