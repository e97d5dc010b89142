"""Exact-match accuracy of an LM on arithmetic-world problems (greedy and sampled)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rft.data.arithmetic import ArithmeticWorld
from rft.lm import sampling


def accuracy(lm_config, params, world: ArithmeticWorld, ids: np.ndarray, key, *,
             temperature: float = 1.0, greedy: bool = False, batch_size: int = 512
             ) -> tuple[float, list[str]]:
  """(fraction of problems whose completion equals the answer exactly, completions)."""
  tok = world.tokenizer
  sc = sampling.SamplingConfig(max_new_tokens=world.max_answer_len + 2,
                               temperature=temperature, greedy=greedy)
  texts = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    pt, pm = world.prompt_tokens(chunk)
    out = sampling.generate(lm_config, params, jnp.asarray(pt), jnp.asarray(pm),
                            jax.random.fold_in(key, start), sampling=sc, eos_id=tok.eos_id,
                            pad_id=tok.pad_id)
    texts += sampling.decode_texts(tok, out)
  correct = [t == world.answers[i] for t, i in zip(texts, ids)]
  return float(np.mean(correct)), texts


def evaluate(lm_config, params, world: ArithmeticWorld, num_problems: int, seed: int = 0,
             temperature: float = 1.0) -> tuple[dict, dict]:
  """Greedy and sampled exact-match accuracy on fixed train / held-out problem sets.

  Returns (metrics, examples): examples[split] holds a few "prompt -> completion" lines.
  """
  out, examples = {}, {}
  for split in ("train", "heldout"):
    ids = world.eval_ids(split, num_problems, seed)
    acc_g, texts = accuracy(lm_config, params, world, ids, jax.random.key(seed), greedy=True)
    acc_s, _ = accuracy(lm_config, params, world, ids, jax.random.key(seed + 1),
                        temperature=temperature)
    out[f"{split}/accuracy_greedy"] = acc_g
    out[f"{split}/accuracy_sampled"] = acc_s
    examples[split] = [f"{world.prompts[i]}{t}  ({'ok' if t == world.answers[i] else 'want ' + world.answers[i]})"
                       for i, t in zip(ids[:8], texts[:8])]
  return out, examples
