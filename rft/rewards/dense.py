"""Dense (process) rewards for language models: a reward per step of a completion, placed on
the token that ends the step, for the GRPO-family losses with per-token advantages
(rft.objectives.grpo.process_advantages).

A dense reward is a text reward (rft.rewards.text) that also has `steps_fn`:

    steps_fn(completions, targets) -> [(ends, rewards), ...]   one pair per completion

`ends[j]` is the character offset in the completion where step j ends (exclusive) and
`rewards[j]` its reward; the step's token is the one holding character ends[j] - 1
(`step_tokens`). The sequence-level `fn` stays what evaluation and the outcome losses read.

**arith_digits** (the arithmetic world's process reward, written for this library): step j
is the j-th character of the completion, rewarded 1 while the completion so far is a
prefix of the answer and 0 from the first wrong character on; one more step at the end
of the completion, placed on its last token (the end-of-sequence token, which decides
where the answer stops), is rewarded 1 when the whole completion is the answer. The first error
is where the rewards stop: a fine-grained signal of where an answer went wrong (as
process supervision in Fine-Grained RLHF, Wu et al. 2023, and DeepSeekMath's
process-supervised GRPO, Shao et al. 2024, reward steps rather than whole outputs).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rft.rewards.base import Reward, register
from rft.rewards.text import _targets


def arith_digit_steps(completion: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
  """(ends [S], rewards [S]) of `arith_digits` for one completion (see the docstring)."""
  c, a = str(completion), str(answer)
  ends, rewards = [], []
  for j in range(len(c)):
    ends.append(j + 1)
    rewards.append(float(c[:j + 1] == a[:j + 1]))
  ends.append(len(c) + 1)  # past the text: the end-of-sequence token (step_tokens)
  rewards.append(float(c == a))
  return np.asarray(ends, np.int64), np.asarray(rewards, np.float32)


@register("arith_digits")
def arith_digits_reward() -> Reward:
  """Process reward per answer character (see the module docstring); sequence value:
  exact match."""

  def fn(completions, targets):
    ts = _targets(targets, len(completions))
    return np.asarray([float(str(c) == str(t)) for c, t in zip(completions, ts)], np.float32)

  def steps(completions, targets):
    ts = _targets(targets, len(completions))
    return [arith_digit_steps(c, t) for c, t in zip(completions, ts)]

  return Reward("arith_digits", fn, differentiable=False, host=True, steps_fn=steps)


def char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
  """For each token of `ids`, the length of the decoded text up to and including it."""
  ids = [int(t) for t in ids]
  return [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]


def step_tokens(tokenizer, tokens: np.ndarray, length: int, ends: Sequence[int]) -> np.ndarray:
  """Token index of each step: the first token whose decoded prefix reaches the step's
  end character (the last token for ends beyond the text; 0 for an empty completion).

  tokens: one completion's ids (its `length` real tokens first)."""
  ends_of = char_ends(tokenizer, np.asarray(tokens)[:length])
  last = max(len(ends_of) - 1, 0)
  return np.asarray([next((i for i, ce in enumerate(ends_of) if ce >= e), last) for e in ends],
                    np.int64)


def dense_reward(reward: Reward, where: str = "config.reward") -> Reward:
  """The one term of `reward` with steps; an error naming `where` otherwise."""
  terms = reward.terms or ((1.0, reward),)
  dense = [(w, r) for w, r in terms if r.steps_fn is not None]
  if len(terms) != 1 or not dense:
    names = [r.name for _, r in terms]
    raise ValueError(f"{where}: process rewards need exactly one reward with per-step "
                     f"values (e.g. 'arith_digits'); got {names}")
  return dense[0][1]
