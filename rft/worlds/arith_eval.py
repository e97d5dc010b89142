"""Accuracy of an LM on a task's problems (greedy and sampled).

A task is `rft.data.arithmetic.ArithmeticWorld` or `rft.data.lm_tasks.PromptFileTask`
(anything with `tokenizer`, `prompts`, `answers`, `eval_ids`, `prompt_tokens`,
`max_answer_len`, `completion_separator`). A completion is scored by exact string
equality with the answer (the arithmetic default) or by a reward function
`reward(texts, answers) -> [n] scores` (e.g. the run's configured `rft.rewards` reward);
accuracy is the mean score.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rft.lm import sampling

ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def score_texts(texts: Sequence[str], answers: Sequence[str], reward: ScoreFn | None = None
                ) -> np.ndarray:
  """[n] float32 scores: 1.0 / 0.0 exact equality when `reward` is None, else reward's."""
  if reward is None:
    return np.asarray([float(t == a) for t, a in zip(texts, answers)], np.float32)
  scores = np.asarray(reward(list(texts), list(answers)), np.float32).reshape(-1)
  if scores.shape != (len(texts),):
    raise ValueError(f"reward returned {scores.shape[0]} scores for {len(texts)} completions")
  return scores


def generate_texts(lm_config, params, world, ids: np.ndarray, key, *, temperature: float = 1.0,
                   greedy: bool = False, batch_size: int = 512,
                   max_new_tokens: int | None = None, placement=None) -> list[str]:
  """Completions of problems `ids` (budget: `max_new_tokens`, else max_answer_len + 2).

  With a `rft.placement.Placement` the prompt rows are split over its data-parallel
  devices (replicated when they do not divide) and the completions gathered to every
  process."""
  tok = world.tokenizer
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens or world.max_answer_len + 2,
                               temperature=temperature, greedy=greedy)
  stops = tuple(tok.stop_sequences)
  texts = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    pt, pm = world.prompt_tokens(chunk)
    pt, pm = ((jnp.asarray(pt), jnp.asarray(pm)) if placement is None
              else placement.batch((pt, pm), size=len(pt), strict=False))
    out = sampling.generate(lm_config, params, pt, pm, jax.random.fold_in(key, start),
                            sampling=sc, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            stop_sequences=stops)
    if placement is not None:
      out = placement.gather(out)
    texts += sampling.decode_texts(tok, out)
  return texts


def example_line(world, i: int, text: str, score: float, exact: bool) -> str:
  """"prompt<sep>completion  (ok | want ANSWER)" for exact scoring, else with the score."""
  sep = world.completion_separator
  if exact:
    tail = "ok" if score > 0 else "want " + world.answers[i]
  else:
    tail = f"score {score:.2f}, want {world.answers[i]}"
  return f"{world.prompts[i]}{sep}{text}  ({tail})"


def evaluate(lm_config, params, world, num_problems: int, seed: int = 0,
             temperature: float = 1.0, *, reward: ScoreFn | None = None,
             max_new_tokens: int | None = None, batch_size: int = 512, placement=None
             ) -> tuple[dict, dict]:
  """Greedy and sampled accuracy on fixed train / held-out problem sets.

  Keys "{split}/accuracy_greedy" and "{split}/accuracy_sampled" (mean score: exact match,
  or `reward`'s). When `reward` is a combined `rft.rewards.base.Reward`, each term's mean
  is added as "{split}/{term}_greedy" / "_sampled". A split with no problems is skipped.
  Returns (metrics, examples): examples[split] holds a few "prompt -> completion" lines.
  """
  out, examples = {}, {}
  terms = getattr(reward, "terms", ())
  for split in ("train", "heldout"):
    ids = world.eval_ids(split, num_problems, seed)
    if not len(ids):
      continue
    answers = [world.answers[i] for i in ids]
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, placement=placement)
    greedy_texts = generate_texts(lm_config, params, world, ids, jax.random.key(seed),
                                  greedy=True, **kw)
    sampled_texts = generate_texts(lm_config, params, world, ids, jax.random.key(seed + 1),
                                   temperature=temperature, **kw)
    for mode, texts in (("greedy", greedy_texts), ("sampled", sampled_texts)):
      scores = score_texts(texts, answers, reward)
      out[f"{split}/accuracy_{mode}"] = float(np.mean(scores))
      if mode == "greedy":
        examples[split] = [example_line(world, i, t, s, reward is None)
                           for i, t, s in zip(ids[:8], texts[:8], scores[:8])]
      if len(terms) > 1:
        for name, s in reward.parts(texts, answers).items():
          out[f"{split}/{name}_{mode}"] = float(np.mean(np.asarray(s, np.float32)))
  return out, examples
