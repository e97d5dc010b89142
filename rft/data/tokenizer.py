"""Word-level tokenizer for closed-vocabulary captions (ShapesWorld)."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD = "<pad>"


class WordTokenizer:
  """Maps whitespace-separated words to ids; id 0 is padding (also the empty prompt).

  An unknown word is an error naming the word and the caption, never a silent <unk>.
  """

  def __init__(self, vocab: Sequence[str], max_len: int):
    if PAD in vocab:
      raise ValueError(f"{PAD!r} is reserved")
    self.vocab = [PAD, *vocab]
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    self.max_len = max_len

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_len: int) -> "WordTokenizer":
    words = sorted({w for t in texts for w in t.split()})
    return cls(words, max_len)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, max_len], right-padded with 0. The empty string is all padding."""
    out = np.zeros((len(texts), self.max_len), np.int32)
    for n, text in enumerate(texts):
      words = text.split()
      if len(words) > self.max_len:
        raise ValueError(f"caption {text!r} has {len(words)} words, more than max_len={self.max_len}")
      for j, w in enumerate(words):
        if w not in self.ids:
          raise KeyError(f"unknown word {w!r} in caption {text!r}; vocabulary: {self.vocab[1:]}")
        out[n, j] = self.ids[w]
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    return [" ".join(self.vocab[int(i)] for i in row if i != 0) for row in np.asarray(tokens)]
