"""Preference pairs and ratings for reward-model training: from the arithmetic world, or
from files.

A pair is (prompt, chosen, rejected) with a soft label p (1: chosen preferred; 1/2: a
tie), a margin m (Llama 2's m(r); 0 without) and categories (for the per-category
report). A rating is (prompt, response, rating). Text is scored as prompt + response
(the arithmetic world's completion follows its prompt directly: "47+38=" + "85").

**Arithmetic world** (`arithmetic_pairs`, `arithmetic_ratings`). Responses are
constructed from the problem, not sampled from the base LM: the correct answer, and
near misses true ± k, k drawn uniformly from [min_offset, max_offset] (default 1..10,
the near misses the arithmetic base LM's noisy corpus taught it to sample). A pair is
(correct, near miss) ranked by correctness; with `tie_fraction` a pair is two different
near misses, labelled a tie (p = 1/2, m = 0). `label_noise` swaps chosen and rejected
of a strict pair with that probability (a careless rater); ratings are 1 (correct) or
0 (near miss), flipped with that probability. Llama-2 margins come from the size of the
error of the rejected answer: |k| ≥ 6 "significantly better" (level 0), 3..5 "better",
2 "slightly better", 1 "negligibly better" (rft.reward_models.losses.LLAMA2_MARGINS).
Categories: operator (+, -, *), difficulty (digits of the true answer) and gap (near
|k| ≤ 2 / far).

**Files** (`read_file`): `.jsonl` (one JSON object a line) or `.parquet` (needs pyarrow
or pandas). Pair rows: prompt, chosen, rejected (strings); optional margin (number),
label (number in [0, 1]) or tie (bool), category (string: category=<value>) or
categories (object), split ("train" / "heldout"). Rating rows: prompt, response
(strings), rating (number); optional category / categories, split. Errors name the
file, the line (jsonl, 1-based) or row (parquet, 0-based) and the field.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from rft.data import lm_tasks
from rft.reward_models import losses

FORMATS = ".jsonl (one JSON object a line) or .parquet"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
RATING_FIELDS = ("prompt", "response", "rating")


@dataclasses.dataclass
class Pairs:
  prompts: list
  chosen: list
  rejected: list
  label: np.ndarray  # [N] float32: 1 chosen preferred, 1/2 a tie
  margin: np.ndarray  # [N] float32
  categories: list  # [N] dicts {key: value}
  where: list  # [N] "file, line n" (files) or "" (generated): for error messages

  def __len__(self):
    return len(self.prompts)

  def take(self, ids) -> "Pairs":
    ids = np.asarray(ids, np.int64)
    pick = lambda xs: [xs[i] for i in ids]
    return Pairs(pick(self.prompts), pick(self.chosen), pick(self.rejected),
                 self.label[ids], self.margin[ids], pick(self.categories), pick(self.where))


@dataclasses.dataclass
class Ratings:
  prompts: list
  responses: list
  rating: np.ndarray  # [N] float32
  categories: list
  where: list

  def __len__(self):
    return len(self.prompts)

  def take(self, ids) -> "Ratings":
    ids = np.asarray(ids, np.int64)
    pick = lambda xs: [xs[i] for i in ids]
    return Ratings(pick(self.prompts), pick(self.responses), self.rating[ids],
                   pick(self.categories), pick(self.where))


# --------------------------------------------------------------------------- arithmetic

def _offsets(rng, n, lo, hi):
  return rng.integers(lo, hi + 1, size=n) * np.where(rng.random(n) < 0.5, 1, -1)


def _categories(world, i: int, offset: int | None) -> dict:
  _, op, _ = world.problems[i]
  digits = len(str(abs(int(world.answers[i]))))
  cats = {"operator": "+-*"[op], "difficulty": f"{digits} digit{'s' * (digits > 1)}"}
  if offset is not None:
    cats["gap"] = "near" if abs(offset) <= 2 else "far"
  return cats


def margin_level(offset) -> np.ndarray:
  """Llama-2 preference level of (correct vs true + offset): 0 for |offset| ≥ 6 ...
  3 for |offset| = 1 (see the module docstring)."""
  a = np.abs(np.asarray(offset))
  return np.where(a >= 6, 0, np.where(a >= 3, 1, np.where(a == 2, 2, 3)))


def arithmetic_pairs(world, ids: Sequence[int], rng: np.random.Generator, *,
                     label_noise: float = 0.0, tie_fraction: float = 0.0,
                     margin: str = "none", min_offset: int = 1, max_offset: int = 10) -> Pairs:
  """One pair per problem id: (correct answer, near miss), or with probability
  `tie_fraction` a tie of two different near misses; chosen and rejected of a strict pair
  swapped with probability `label_noise`. `margin`: "none", or a Llama 2 variant
  ("small", "large") whose m(level) is given to strict pairs."""
  if not 1 <= min_offset <= max_offset:
    raise ValueError(f"offsets: need 1 <= min_offset ({min_offset}) <= max_offset "
                     f"({max_offset})")
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  off = _offsets(rng, n, min_offset, max_offset)
  off2 = _offsets(rng, n, min_offset, max_offset)
  off2 = np.where(off2 == off, -off, off2)  # the two near misses of a tie differ
  tie = rng.random(n) < tie_fraction
  flip = (rng.random(n) < label_noise) & ~tie
  truth = np.asarray([int(world.answers[i]) for i in ids], np.int64)
  good = np.where(tie, truth + off2, truth)
  bad = truth + off
  chosen = np.where(flip, bad, good)
  rejected = np.where(flip, good, bad)
  m = (np.zeros(n, np.float32) if margin == "none"
       else losses.llama2_margin(margin_level(off), margin))
  m = np.where(tie, 0.0, m).astype(np.float32)
  cats = [_categories(world, int(i), None if t else int(o)) for i, o, t in zip(ids, off, tie)]
  return Pairs([world.prompts[i] for i in ids], [str(x) for x in chosen],
               [str(x) for x in rejected], np.where(tie, 0.5, 1.0).astype(np.float32), m,
               cats, [""] * n)


def arithmetic_ratings(world, ids: Sequence[int], rng: np.random.Generator, *,
                       label_noise: float = 0.0, wrong_fraction: float = 0.5,
                       min_offset: int = 1, max_offset: int = 10) -> Ratings:
  """One rated response per problem id: the correct answer (rating 1) or, with
  probability `wrong_fraction`, a near miss (rating 0); ratings flipped with probability
  `label_noise`."""
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  off = _offsets(rng, n, min_offset, max_offset)
  wrong = rng.random(n) < wrong_fraction
  truth = np.asarray([int(world.answers[i]) for i in ids], np.int64)
  resp = np.where(wrong, truth + off, truth)
  rating = np.where(wrong, 0.0, 1.0)
  rating = np.where(rng.random(n) < label_noise, 1.0 - rating, rating).astype(np.float32)
  cats = [_categories(world, int(i), int(o) if w else None)
          for i, o, w in zip(ids, off, wrong)]
  return Ratings([world.prompts[i] for i in ids], [str(x) for x in resp], rating, cats,
                 [""] * n)


# --------------------------------------------------------------------------- files

def _rows(path: str) -> list[tuple[str, dict]]:
  """[(where, row)]: where = "<path>, line n" (jsonl) or "<path>, row n" (parquet)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".jsonl", ".parquet"):
    raise ValueError(f"reward-model data file {path}: unknown extension {ext!r}; use {FORMATS}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"reward-model data file {path} not found ({FORMATS})")
  if ext == ".parquet":
    rows = [(f"{path}, row {i}", r) for i, r in enumerate(lm_tasks.read_parquet(path))]
  else:
    text = lm_tasks.read_utf8(path, "reward-model data file")
    rows = [(f"{path}, {where}", r) for where, r in lm_tasks.json_lines(text, path)]
  for where, r in rows:
    if not isinstance(r, dict):
      raise ValueError(f"{where}: expected a JSON object, got a {type(r).__name__}")
  if not rows:
    raise ValueError(f"reward-model data file {path} holds no rows")
  return rows


def _field(where: str, row: dict, key: str, kind: str, needed: Sequence[str]):
  if key not in row:
    raise ValueError(f"{where}: missing field {key!r} (a {kind} row needs "
                     f"{', '.join(needed)}); fields found: {sorted(row)}")
  return row[key]


def _text(where, row, key, kind, needed) -> str:
  v = _field(where, row, key, kind, needed)
  if not isinstance(v, str):
    raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__} {v!r}")
  return v


def _number(where, key, v, lo=None, hi=None) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"{where}: field {key!r} must be a finite number, got {v!r}")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ValueError(f"{where}: field {key!r}={v!r} must be in [{lo}, {hi}]")
  return float(v)


def _row_categories(where, row) -> dict:
  if "categories" in row:
    c = row["categories"]
    if not isinstance(c, dict):
      raise ValueError(f"{where}: field 'categories' must be an object, got {c!r}")
    return {str(k): str(v) for k, v in c.items()}
  return {"category": str(row["category"])} if "category" in row else {}


def _split(where, row) -> str:
  s = row.get("split", "")
  if s not in ("", "train", "heldout", "test"):
    raise ValueError(f"{where}: field 'split'={s!r}; use 'train' or 'heldout' (or 'test')")
  return "heldout" if s == "test" else s


def read_file(path: str, kind: str = "auto") -> tuple[Pairs | Ratings, list]:
  """(Pairs or Ratings, per-row split "" / "train" / "heldout") of a jsonl / parquet
  file (see the module docstring). `kind` "pairs", "ratings" or "auto" (from the first
  row: a "chosen" field means pairs, a "rating" field ratings)."""
  rows = _rows(path)
  if kind == "auto":
    first_where, first = rows[0]
    if "chosen" in first or "rejected" in first:
      kind = "pairs"
    elif "rating" in first or "response" in first:
      kind = "ratings"
    else:
      raise ValueError(f"{first_where}: neither a pair ({', '.join(PAIR_FIELDS)}) nor a "
                       f"rating row ({', '.join(RATING_FIELDS)}); fields found: "
                       f"{sorted(first)}")
  if kind not in ("pairs", "ratings"):
    raise ValueError(f"kind={kind!r}; use 'pairs', 'ratings' or 'auto'")
  splits = [_split(w, r) for w, r in rows]
  wheres = [w for w, _ in rows]
  cats = [_row_categories(w, r) for w, r in rows]
  if kind == "ratings":
    prompts, responses, ratings = [], [], []
    for w, r in rows:
      prompts.append(_text(w, r, "prompt", "rating", RATING_FIELDS))
      responses.append(_text(w, r, "response", "rating", RATING_FIELDS))
      ratings.append(_number(w, "rating", _field(w, r, "rating", "rating", RATING_FIELDS)))
    return Ratings(prompts, responses, np.asarray(ratings, np.float32), cats, wheres), splits
  prompts, chosen, rejected, labels, margins = [], [], [], [], []
  for w, r in rows:
    prompts.append(_text(w, r, "prompt", "pair", PAIR_FIELDS))
    chosen.append(_text(w, r, "chosen", "pair", PAIR_FIELDS))
    rejected.append(_text(w, r, "rejected", "pair", PAIR_FIELDS))
    label = 1.0
    if "label" in r:
      label = _number(w, "label", r["label"], 0.0, 1.0)
    if "tie" in r:
      if not isinstance(r["tie"], bool):
        raise ValueError(f"{w}: field 'tie' must be true or false, got {r['tie']!r}")
      label = 0.5 if r["tie"] else label
    labels.append(label)
    margins.append(_number(w, "margin", r["margin"]) if "margin" in r else 0.0)
  return Pairs(prompts, chosen, rejected, np.asarray(labels, np.float32),
               np.asarray(margins, np.float32), cats, wheres), splits


def split_rows(splits: Sequence[str], heldout_fraction: float, seed: int) -> dict:
  """{"train": ids, "heldout": ids}: rows with a split field keep it; the others are
  held out with probability `heldout_fraction` (seeded)."""
  s = np.asarray(splits, object)
  held = np.random.default_rng([seed, 11]).random(len(s)) < heldout_fraction
  held = np.where(s == "", held, s == "heldout")
  return {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held)}


# --------------------------------------------------------------------------- tokens

def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int,
           where: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded [N, max_len] ids of BOS + prompt + response + EOS and their bool mask
  (the last column is every row's EOS: the last-token pooling position). A text the
  tokenizer cannot encode or longer than `max_len` is an error naming its file and line
  when `where` gives them."""
  toks = np.full((len(prompts), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros(toks.shape, bool)
  for r, (p, c) in enumerate(zip(prompts, responses)):
    at = f"{where[r]}: " if where is not None and where[r] else ""
    try:
      ids = tokenizer.encode(p + c, bos=True, eos=True)
    except ValueError as e:
      raise ValueError(f"{at}{e}") from None
    if len(ids) > max_len:
      raise ValueError(f"{at}{p + c!r} is {len(ids)} tokens with BOS and EOS, more than "
                       f"max_len={max_len} (config.max_len)")
    toks[r, -len(ids):], mask[r, -len(ids):] = ids, True
  return toks, mask
