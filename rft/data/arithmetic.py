"""The arithmetic world: the embedded default for LM reward finetuning.

Problems are `a<op>b=` with an integer answer, e.g. prompt "47+38=" and answer "85".
Operands are 0..max_operand for `+` and `-` and 0..max_operand x 0..9 for `*`, so a
tiny character-level LM learns the task in minutes on a CPU but makes mistakes.

Held-out split (seeded, `holdout_fraction`): a held-out problem's *operand pair* never
appears in training for that operator, so held-out accuracy measures generalisation of
the algorithm rather than recall. Every digit and operator still appears in training.

Tokens: a `CharTokenizer` over a fixed alphabet with PAD=0, BOS=1, EOS=2. A completion is
the answer followed by EOS; the verifiable reward checks it exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALPHABET = "0123456789+-*= "


class CharTokenizer:
  """Characters <-> ids. PAD=0, BOS=1, EOS=2, then the alphabet in order."""

  pad_id, bos_id, eos_id = 0, 1, 2
  specials = ("<pad>", "<bos>", "<eos>")
  stop_sequences: tuple = ()  # EOS alone ends a completion

  def __init__(self, alphabet: str = ALPHABET):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    self.alphabet = alphabet
    self._ids = {ch: i + len(self.specials) for i, ch in enumerate(alphabet)}

  @property
  def vocab_size(self) -> int:
    return len(self.specials) + len(self.alphabet)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = [self.bos_id] if bos else []
    for pos, ch in enumerate(text):
      if ch not in self._ids:
        raise ValueError(f"character {ch!r} at position {pos} of {text!r} is not in the "
                         f"tokenizer alphabet {self.alphabet!r}")
      ids.append(self._ids[ch])
    return ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Text up to the first EOS; PAD and BOS are skipped."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i >= len(self.specials):
        out.append(self.alphabet[i - len(self.specials)])
    return "".join(out)


class SplitSampling:
  """Problem ids by split, for any task with `split_ids = {"train": ..., "heldout": ...}`."""

  split_ids: dict

  def sample_ids(self, split: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` problem ids of a split drawn with replacement (a run's problems are a function
    of its rng)."""
    return rng.choice(self._split(split), size=n, replace=True)

  def eval_ids(self, split: str, n: int, seed: int = 0) -> np.ndarray:
    """A fixed subset of `n` problems of a split (the same for every run); may be empty."""
    ids = self._split(split)
    return np.sort(np.random.default_rng([seed, 7]).choice(ids, min(n, len(ids)),
                                                              replace=False))

  def _split(self, split: str) -> np.ndarray:
    if split not in self.split_ids:
      raise ValueError(f"split={split!r}; use 'train' or 'heldout'")
    return self.split_ids[split]


@dataclasses.dataclass
class ArithmeticWorld(SplitSampling):
  """All problems of the world, split into train and held-out."""
  max_operand: int = 99
  ops: str = "+-*"
  holdout_fraction: float = 0.2
  split_seed: int = 0
  completion_separator = ""  # between prompt and completion in logged samples ("7+8=15")

  def __post_init__(self):
    unknown = set(self.ops) - set("+-*")
    if unknown:
      raise ValueError(f"ops={self.ops!r}: unknown operator(s) {sorted(unknown)}; use + - *")
    self.tokenizer = CharTokenizer()
    rows = []
    for op in self.ops:
      b_max = 9 if op == "*" else self.max_operand
      for a in range(self.max_operand + 1):
        for b in range(b_max + 1):
          rows.append((a, "+-*".index(op), b))
    self.problems = np.asarray(rows, np.int64)  # [n, 3]: a, op index, b
    rng = np.random.default_rng(self.split_seed)
    held = rng.random(len(rows)) < self.holdout_fraction
    self.split_ids = {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held)}
    self.prompts = [f"{a}{'+-*'[o]}{b}=" for a, o, b in rows]
    self.answers = [str(_apply(a, o, b)) for a, o, b in rows]
    self.max_prompt_len = max(len(p) for p in self.prompts) + 1  # + BOS
    # + EOS, + 1 spare character (room for the near-miss answers of a noisy corpus).
    self.max_answer_len = max(len(a) for a in self.answers) + 2

  def prompt_tokens(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [n, max_prompt_len] BOS+prompt ids and their bool mask."""
    return left_pad([self.tokenizer.encode(self.prompts[i], bos=True) for i in ids],
                    self.max_prompt_len, self.tokenizer.pad_id)

  def answer_tokens(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [n, max_answer_len] answer+EOS ids and their bool mask."""
    return self.answer_tokens_for([self.answers[i] for i in ids])

  def answer_tokens_for(self, answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [n, max_answer_len] ids of the given answer strings + EOS."""
    seqs = [self.tokenizer.encode(a, eos=True) for a in answers]
    toks = np.full((len(seqs), self.max_answer_len), self.tokenizer.pad_id, np.int32)
    mask = np.zeros(toks.shape, bool)
    for r, s in enumerate(seqs):
      if len(s) > self.max_answer_len:
        raise ValueError(f"answer {answers[r]!r} has {len(s)} tokens with EOS, more than "
                         f"max_answer_len={self.max_answer_len}")
      toks[r, :len(s)], mask[r, :len(s)] = s, True
    return toks, mask


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  toks = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for r, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {r} has {len(s)} tokens, more than length={length}")
    if len(s):
      toks[r, -len(s):], mask[r, -len(s):] = s, True
  return toks, mask


def _apply(a: int, op: int, b: int) -> int:
  return a + b if op == 0 else a - b if op == 1 else a * b
