"""Best-of-N reranking at inference: keep the sample a reward (an outcome reward model, a
confidence, a judge) scores highest among N samples of the same prompt.

    best_of_n(scores [Q * N], N)[q] = q * N + argmax_j scores[q * N + j]

(the first maximum on ties). `rerank_table` compares it, on the same samples, with one
sample per prompt, majority vote over the N answers (self-consistency) and the oracle
(any of the N correct: pass@N), given a correctness label per sample.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def _groups(x, n: int, what: str) -> np.ndarray:
  x = np.asarray(x)
  if n < 1 or x.ndim != 1 or x.shape[0] % n:
    raise ValueError(f"{what}: {x.shape[0] if x.ndim == 1 else x.shape} values do not split "
                     f"into groups of N={n}")
  return x.reshape(-1, n)


def best_of_n(scores, n: int) -> np.ndarray:
  """[Q] flat indices of each group's highest-scoring sample (first on ties)."""
  g = _groups(np.asarray(scores, np.float64), n, "best_of_n scores")
  if not np.isfinite(g).all():
    raise ValueError("best_of_n: scores hold NaN or infinite values")
  return np.arange(len(g)) * n + np.argmax(g, axis=1)


def majority_vote(answers: Sequence[str], n: int) -> np.ndarray:
  """[Q] flat indices of the first sample giving each group's most frequent answer."""
  if len(answers) % n:
    raise ValueError(f"majority_vote: {len(answers)} answers do not split into groups of N={n}")
  out = []
  for q in range(len(answers) // n):
    group = list(answers[q * n:(q + 1) * n])
    top = Counter(group).most_common(1)[0][0]
    out.append(q * n + group.index(top))
  return np.asarray(out, np.int64)


def rerank_table(scores, correct, n: int, answers: Sequence[str] | None = None) -> dict:
  """Accuracies over Q prompts of N samples each: "one_sample" (the first of each group),
  "best_of_n" (by `scores`), "majority_vote" (with `answers`), "oracle" (any correct),
  and "mean_sample" (the mean over all samples: one sample's expected accuracy)."""
  c = _groups(np.asarray(correct, np.float64), n, "rerank_table correct")
  flat = c.reshape(-1)
  out = {"one_sample": float(c[:, 0].mean()), "mean_sample": float(c.mean()),
         "best_of_n": float(flat[best_of_n(scores, n)].mean()),
         "oracle": float(c.max(axis=1).mean())}
  if answers is not None:
    out["majority_vote"] = float(flat[majority_vote(answers, n)].mean())
  return out


def best_of_n_curve(scores, gold, ns: Sequence[int]) -> dict[int, dict]:
  """Best-of-n for several n from the same M samples per prompt: each prompt's M samples
  split into M // n disjoint groups of n (in order), the highest-scoring sample of each
  group kept. For each n: {"reward": mean score of the kept samples (the proxy),
  "gold": mean `gold` of the kept samples (e.g. an independent evaluator's verdict)}.

  scores, gold: [Q, M]. Proxy rising with n while gold falls is reward overoptimization
  (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization", measure it with
  best-of-n exactly so)."""
  s, g = np.asarray(scores, np.float64), np.asarray(gold, np.float64)
  if s.ndim != 2 or s.shape != g.shape:
    raise ValueError(f"best_of_n_curve: scores {s.shape} and gold {g.shape} must be the same "
                     f"[prompts, samples] shape")
  out = {}
  for n in ns:
    if n < 1 or s.shape[1] % n:
      raise ValueError(f"best_of_n_curve: n={n} does not divide the {s.shape[1]} samples per "
                       f"prompt")
    picks = best_of_n(s.reshape(-1), n)
    out[int(n)] = {"reward": float(s.reshape(-1)[picks].mean()),
                   "gold": float(g.reshape(-1)[picks].mean())}
  return out
