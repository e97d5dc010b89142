"""CoPG for LMs: contrastive policy gradient on pairs of completions, anchored to π_ref.

Flet-Berliac et al. 2024, "Contrastive Policy Gradient: Aligning LLMs on sequence-level
scores in a supervised-friendly fashion". With the KL-regularised reward of a completion

    R_β^π(y) = R(y) − β ln π(y|x)/π_ref(y|x)        (ln π(y|x) = Σ_t ln π(y_t | x, y_<t))

the CoPG update for two completions y, y' of one prompt, drawn from any behaviour
policy μ (here π_old, the sampler of the step), is the policy gradient in which each
completion's baseline is its partner's regularised reward:

    g = (R_β^π(y) − R_β^π(y')) · ∇(ln π(y|x) − ln π(y'|x))

Its fixed point is π* ∝ π_ref · exp(R/β), the optimum of the KL-regularised objective,
whatever μ: no importance ratio to μ is needed, which makes the method off-policy. As a
loss, g is −∇ of the surrogate −sg[R_β^π(y) − R_β^π(y')] · (ln π(y) − ln π(y')) (sg: stop
gradient), and −1/(2β) times the gradient of the squared, "supervised-friendly" form
this module minimises (the loss value is then a regression error):

    ℓ(y, y') = ( R(y) − R(y') − β [ ln π(y)/π_ref(y) − ln π(y')/π_ref(y') ] )²
             = ( R_β^π(y) − R_β^π(y') )²,        ∇ℓ = −2β g

With h = ln π(y)/π_ref(y) − ln π(y')/π_ref(y'), ℓ = β² (h − (R(y) − R(y'))/β)²: IPO's
loss (h − 1/(2β))² scaled by β², with the fixed margin replaced by the reward difference
(the paper's "generalises IPO").

L = the mean of ℓ over the pairs of every group (rft.objectives.lm_pairs). β > 0 is
required (with β = 0, ℓ does not depend on π). The same regression as REBEL with the
anchor π_ref in place of π_old and β in place of 1/η.
"""
from __future__ import annotations

from rft.objectives import lm_pairs, registry


def copg_loss(log_probs, ref_log_probs, mask, rewards, pair_group, valid, *, beta: float,
              old_log_probs=None):
  """CoPG loss (scalar) and metrics (module docstring).

  log_probs / ref_log_probs: [n, L] token log-probs under θ and π_ref; mask [n, L]
  (completion mask × loss weight); rewards [n]; pair_group [n]; valid [n] bool.
  old_log_probs (optional, [n, L]) only feeds the ratio_mean metric.
  """
  if beta <= 0:
    raise ValueError(f"CoPG needs beta > 0, got {beta}")
  seq_ref_ratio = lm_pairs.sequence_sum(log_probs - ref_log_probs, mask)  # ln π(y)/π_ref(y)
  loss, metrics = lm_pairs.pair_regression(beta * seq_ref_ratio, rewards, pair_group, valid)
  metrics.update(loss=loss, log_ratio_ref_sequence=seq_ref_ratio.mean())
  if old_log_probs is not None:
    metrics["ratio_mean"] = lm_pairs.ratio_mean(log_probs, old_log_probs, mask)
  return loss, metrics


def _check(config):
  lm_pairs.check(config, "copg")
  if config.objective.beta <= 0:
    raise ValueError(f"config.objective.beta={config.objective.beta}: CoPG's regularised "
                     f"reward R − β ln π/π_ref needs beta > 0 (with 0 the loss does not "
                     f"depend on the policy)")


def _loss(kw, log_probs, mask, batch):
  return copg_loss(log_probs, batch["ref_log_probs"], mask, batch["rewards"],
                   batch["pair_group"], batch["loss_weight"] > 0, beta=kw["beta"],
                   old_log_probs=batch["old_log_probs"])


registry.register_lm(registry.LMObjective(
    name="copg", summary="contrastive policy gradient: least squares of β ln π/π_ref "
                         "differences onto reward differences of pairs (Flet-Berliac et al. "
                         "2024)",
    settings=lambda o: {"beta": float(o.beta), "pairs": o.pairs},
    check=_check, prepare=lm_pairs.prepare, loss=_loss,
    uses_reference=lambda kw: True,
    label=lambda config: f"{config.objective.pairs}_pairs"))
