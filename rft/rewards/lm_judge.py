"""Rewards read off a language model's own probabilities: confidence (CRew) and a judge's
P(yes) (generative reward models).

**lm_confidence** (Confidence-as-a-Reward, Du et al. 2025, "Confidence as a Reward:
Transforming LLMs into Reward Models"): the mean probability a fixed LM gives the tokens
of the completion's final answer,

    r(x, y) = (1 / |A|) * sum_{i in A} p(y_i | x, y_<i)

where A are the tokens of y that make up its final answer (rft.rewards.text's
`extract_answer`: the last \\boxed{...}, <answer>...</answer>, "####" line, "answer:"
line, else the last number; a completion with no answer scores 0). `statistic="geo"`
gives exp(mean log p) instead, `"min"` the least probable answer token. Training-free:
the scoring LM is not the policy being trained.

**lm_judge** (a generative reward, as RewardDance: Wu et al. 2025, "RewardDance: Reward
Scaling in Visual Generation", which reads the reward off a judge's probability of
"yes"): the judge reads `template` filled with the prompt and the completion and

    r(x, y) = p(yes | template(x, y))                          (normalize=False)
    r(x, y) = p(yes | ...) / (p(yes | ...) + p(no | ...))       (normalize=True)

for the next token after the template; `yes` and `no` must each be one token of the
judge's vocabulary.

The LM is `path`: an arithmetic LM bundle folder (arith_base.{msgpack,json}; "" = the
shipped rft/assets/arith_base) or a HF model folder (config.json + safetensors and its
tokenizer; rft.weights.hf_lm). Text-reward interface (rft.rewards.text): `reward(
completions, targets)` with `targets` a mapping holding "prompts" (what the LM loop
passes); host rewards, not differentiated.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rft.rewards.base import Reward, register
from rft.rewards.dense import char_ends
from rft.rewards.text import extract_answer, prompts_of

STATISTICS = ("mean", "geo", "min")


@dataclasses.dataclass
class ScoringLM:
  """A frozen decoder LM and its tokenizer, scoring texts in fixed-size batches."""
  config: Any
  params: Any
  tokenizer: Any
  batch_size: int = 256

  def __post_init__(self):
    from rft.lm import sampling  # pylint: disable=g-import-not-at-top
    from rft.models import lm  # pylint: disable=g-import-not-at-top
    cfg = self.config

    def next_logp(params, tokens, mask):
      logits, _ = lm.forward(cfg, params, tokens, sampling.positions_from_mask(mask), mask)
      return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)

    self._next = jax.jit(next_logp)
    self._tokens = jax.jit(lambda p, pt, pm, c, cm: sampling.token_log_probs(
        cfg, p, pt, pm, c, cm))

  # ------------------------------------------------------------------ tokenizing
  def ids(self, text: str, bos: bool = False) -> list[int]:
    """Ids of `text` (BOS first when `bos` and the tokenizer has one); no EOS."""
    tok = self.tokenizer
    if hasattr(tok, "chat"):  # rft.data.lm_tasks.HFTokenizer
      return ([tok.bos_id] if bos and tok.bos_id is not None else []) + tok.encode(text)
    return tok.encode(text, bos=bos)

  def char_ends(self, ids: Sequence[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it."""
    return char_ends(self.tokenizer, ids)

  # ------------------------------------------------------------------ batches
  def _batches(self, n: int):
    for s in range(0, n, self.batch_size):
      yield s, min(n, s + self.batch_size)

  @staticmethod
  def _pad_rows(*arrays):
    """Rows padded (repeating the last) to a multiple of 8: few batch shapes, few compiles."""
    n = len(arrays[0])
    pad = (-n) % 8
    if not pad:
      return arrays
    return tuple(np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in arrays)

  def next_token_log_probs(self, texts: Sequence[str]) -> np.ndarray:
    """[n, vocab] log-probabilities of the token after BOS + each text."""
    pad_id = self.tokenizer.pad_id
    out = []
    for s, e in self._batches(len(texts)):
      seqs = [self.ids(t, bos=True) for t in texts[s:e]]
      if not all(seqs):
        raise ValueError("a judge text is empty and the tokenizer has no BOS: nothing to "
                         "condition the next token on")
      width = max(len(x) for x in seqs)
      toks = np.full((len(seqs), width), pad_id, np.int32)
      mask = np.zeros(toks.shape, bool)
      for r, x in enumerate(seqs):
        toks[r, width - len(x):], mask[r, width - len(x):] = x, True
      t, m = self._pad_rows(toks, mask)
      out.append(np.asarray(self._next(self.params, t, m))[:len(seqs)])
    return np.concatenate(out) if out else np.zeros((0, self.config.vocab_size), np.float32)

  def completion_log_probs(self, prompts: Sequence[str], completions: Sequence[str]
                           ) -> tuple[list[list[int]], list[np.ndarray]]:
    """Each completion's ids and the log-probability of each of them after BOS + prompt."""
    pad_id = self.tokenizer.pad_id
    all_ids, all_lp = [], []
    for s, e in self._batches(len(prompts)):
      ps = [self.ids(p, bos=True) for p in prompts[s:e]]
      cs = [self.ids(c) for c in completions[s:e]]
      if not all(ps):
        raise ValueError("a prompt is empty and the tokenizer has no BOS: the first "
                         "completion token has nothing to condition on")
      pw, cw = max(len(x) for x in ps), max(1, max(len(x) for x in cs))
      pt = np.full((len(ps), pw), pad_id, np.int32)
      pm = np.zeros(pt.shape, bool)
      ct = np.full((len(cs), cw), pad_id, np.int32)
      cm = np.zeros(ct.shape, np.float32)
      for r, (p, c) in enumerate(zip(ps, cs)):
        pt[r, pw - len(p):], pm[r, pw - len(p):] = p, True
        ct[r, :len(c)], cm[r, :len(c)] = c, 1.0
      lp = np.asarray(self._tokens(self.params, *self._pad_rows(pt, pm, ct, cm)))
      all_ids += cs
      all_lp += [lp[r, :len(c)] for r, c in enumerate(cs)]
    return all_ids, all_lp


@functools.lru_cache(maxsize=8)
def load_scoring_lm(path: str = "", batch_size: int = 256, allow_pickle: bool = False
                    ) -> ScoringLM:
  """The LM in `path` (see the module docstring) as a ScoringLM; one per (path,
  batch_size, allow_pickle) per process, so rewards built again (an evaluation beside
  training, a test) reuse its weights and compiled programs."""
  from rft import pretrained  # pylint: disable=g-import-not-at-top
  directory = pretrained.resolve_dir(path or None)
  if pretrained.exists("arith_base", directory):
    from rft.data.arithmetic import CharTokenizer  # pylint: disable=g-import-not-at-top
    cfg, params, _ = pretrained.load_arith_base(directory)
    return ScoringLM(cfg, params, CharTokenizer(), batch_size)
  if path and os.path.isfile(os.path.join(path, "config.json")):
    from rft.data import lm_tasks  # pylint: disable=g-import-not-at-top
    from rft.weights import hf_lm  # pylint: disable=g-import-not-at-top
    cfg, params = hf_lm.load_lm(path, allow_pickle=allow_pickle)
    tok = lm_tasks.HFTokenizer(hf_lm.load_tokenizer(path))
    return ScoringLM(cfg, params, tok, batch_size)
  raise FileNotFoundError(f"{path or directory}: neither an arithmetic LM bundle "
                          f"(arith_base.msgpack + arith_base.json) nor a HF model folder "
                          f"(config.json)")


def answer_token_mask(completion: str, ids: Sequence[int], char_ends: Sequence[int]
                      ) -> np.ndarray:
  """[len(ids)] bool: the tokens whose text overlaps the completion's final answer (the
  last occurrence of `extract_answer`'s string); all False when there is no answer."""
  mask = np.zeros(len(ids), bool)
  answer = extract_answer(completion)
  if answer is None or not answer.strip():
    return mask
  answer = answer.strip()
  a0 = completion.rfind(answer)
  if a0 < 0:
    return mask
  a1 = a0 + len(answer)
  start = 0
  for i, end in enumerate(char_ends):
    if start < a1 and end > a0:
      mask[i] = True
    start = end
  return mask


def confidence(log_probs: np.ndarray, mask: np.ndarray, statistic: str = "mean") -> float:
  """CRew's score of one completion from its tokens' log-probs and the answer mask."""
  if not mask.any():
    return 0.0
  lp = np.asarray(log_probs, np.float64)[mask]
  if statistic == "mean":
    return float(np.mean(np.exp(lp)))
  if statistic == "geo":
    return float(np.exp(np.mean(lp)))
  if statistic == "min":
    return float(np.exp(np.min(lp)))
  raise ValueError(f"confidence statistic {statistic!r}; use one of {STATISTICS}")


@register("lm_confidence")
def lm_confidence(path: str = "", statistic: str = "mean", batch_size: int = 256,
                  allow_pickle: bool = False) -> Reward:
  """CRew: mean probability of the final answer's tokens under the LM in `path`."""
  if statistic not in STATISTICS:
    raise ValueError(f"config.reward_options.lm_confidence.statistic={statistic!r}; use one "
                     f"of {STATISTICS}")
  scorer = load_scoring_lm(path, batch_size, allow_pickle)

  def fn(completions: Sequence[str], targets=None) -> np.ndarray:
    completions = [str(c) for c in completions]
    prompts = prompts_of(targets, len(completions), "lm_confidence")
    ids, lps = scorer.completion_log_probs(prompts, completions)
    return np.asarray([confidence(lp, answer_token_mask(c, i, scorer.char_ends(i)), statistic)
                       for c, i, lp in zip(completions, ids, lps)], np.float32)

  return Reward("lm_confidence", fn, differentiable=False, host=True)


def _one_token(scorer: ScoringLM, text: str, key: str) -> int:
  ids = scorer.ids(text)
  if len(ids) != 1:
    raise ValueError(f"config.reward_options.lm_judge.{key}={text!r} is {len(ids)} tokens "
                     f"of the judge's vocabulary; it must be exactly one")
  return ids[0]


@register("lm_judge")
def lm_judge(path: str = "", template: str = "{prompt}{completion}", yes: str = "",
             no: str = "", normalize: bool = True, batch_size: int = 256,
             allow_pickle: bool = False) -> Reward:
  """P(yes) of the judge LM in `path` after `template` (see the module docstring)."""
  where = "config.reward_options.lm_judge"
  if "{completion}" not in template:
    raise ValueError(f"{where}.template={template!r} has no '{{completion}}' field")
  try:
    template.format(prompt="", completion="")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"{where}.template={template!r}: only the fields {{prompt}} and "
                     f"{{completion}} may appear ({e!r})") from None
  if not yes:
    raise ValueError(f"{where}.yes is not set: give the judge's one-token answer that means "
                     f"'good' (and .no for the normalised P(yes) / (P(yes) + P(no)))")
  if normalize and not no:
    raise ValueError(f"{where}.normalize=True needs {where}.no (the 'bad' token); or set "
                     f"normalize=False for the raw P(yes)")
  scorer = load_scoring_lm(path, batch_size, allow_pickle)
  yes_id = _one_token(scorer, yes, "yes")
  no_id = _one_token(scorer, no, "no") if no else None

  def fn(completions: Sequence[str], targets=None) -> np.ndarray:
    completions = [str(c) for c in completions]
    prompts = (prompts_of(targets, len(completions), "lm_judge")
               if "{prompt}" in template else [""] * len(completions))
    texts = [template.format(prompt=p, completion=c) for p, c in zip(prompts, completions)]
    logp = scorer.next_token_log_probs(texts).astype(np.float64)
    p_yes = np.exp(logp[:, yes_id])
    if normalize:
      p_yes = p_yes / (p_yes + np.exp(logp[:, no_id]))
    return p_yes.astype(np.float32)

  return Reward("lm_judge", fn, differentiable=False, host=True)
