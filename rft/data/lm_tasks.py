"""Prompt files and HF tokenizers for the LM online loop (rft.train.lm_rl).

The loop needs a *task* and a *tokenizer* with a small interface, which
`rft.data.arithmetic.ArithmeticWorld` / `CharTokenizer` provide for the embedded world and
this module provides for real models:

* :class:`HFTokenizer` wraps a `transformers` tokenizer: `pad_id`, `eos_id`, `encode`,
  `decode`, `chat` (the model's chat template), plus `stop_sequences` (the other end-of-turn
  ids of `generation_config.json`, e.g. Qwen's `<|im_end|>` and `<|endoftext|>`).
* :class:`PromptFileTask` reads problems from a `.jsonl`, `.json` or `.parquet` file:
  `tokenizer`, `prompts`, `answers`, `split_ids`, `max_prompt_len`, `max_answer_len`,
  `sample_ids`, `eval_ids`, `prompt_tokens`.

A prompt file holds one object per problem, e.g. (jsonl)::

    {"prompt": "What is 17 * 3?", "answer": "51"}
    {"question": "...", "answer": "... #### 72", "split": "test"}

Keys: `prompt_key` (aliases `question`, `problem`) and `answer_key` (aliases `solution`,
`ground_truth`, `reward_model.ground_truth`); dotted keys reach into nested objects (the
verl parquet layout). A prompt is a string or a list of chat messages
(`{"role", "content"}`). The reference answer is the last `\\boxed{...}` of the answer text
if it has one (MATH solutions), else the text after its last `####` (GSM8K), else the whole
stripped text; numbers are written with `str`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from absl import logging

from rft.data.arithmetic import SplitSampling, left_pad
from rft.rewards.text import last_boxed

FORMATS = ".jsonl (one JSON object a line), .json (a list of objects) or .parquet"
PROMPT_ALIASES = ("question", "problem")
ANSWER_ALIASES = ("solution", "ground_truth", "reward_model.ground_truth")
TRAIN_SPLITS = ("train",)
HELDOUT_SPLITS = ("test", "heldout", "validation", "val", "eval", "dev")
# Files `HFTokenizer` users copy next to an exported model (see rft.train.lm_rl).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


# --------------------------------------------------------------------------- tokenizer


class HFTokenizer:
  """A `transformers` tokenizer behind the interface of `CharTokenizer`.

  Args:
    tokenizer: a `transformers` tokenizer (e.g. `rft.weights.hf_lm.load_tokenizer(path)`).
    extra_eos_ids: further ids that end a completion (e.g. from
      :func:`generation_eos_ids`); the sampler stops on them (`stop_sequences`) and
      `decode` cuts at them, like at `eos_id`.

  `eos_id` is the tokenizer's eos token (an error if it has none); `pad_id` is its pad token,
  else `eos_id` (pads are masked out everywhere). `bos_id` is the BOS id when the tokenizer
  adds one to encoded text (Llama), else None (Qwen); :class:`PromptFileTask` prepends it to
  prompts that do not start with it.
  """

  def __init__(self, tokenizer, *, extra_eos_ids: Iterable[int] = ()):
    self.tokenizer = tokenizer
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer {name!r} has no eos_token: set \"eos_token\" in its "
                       f"tokenizer_config.json (completions must be able to end)")
    self.eos_id = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else int(pad)
    ends = [self.eos_id]
    for i in extra_eos_ids:
      if int(i) not in ends:
        ends.append(int(i))
    self.eos_ids = tuple(ends)
    self.bos_id = None
    bos = tokenizer.bos_token_id
    if bos is not None:
      probe = tokenizer.encode("0", add_special_tokens=True)
      if probe and probe[0] == bos:
        self.bos_id = int(bos)

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return len(self.tokenizer)

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.tokenizer, "chat_template", None))

  @property
  def stop_sequences(self) -> tuple[tuple[int, ...], ...]:
    """The end ids other than `eos_id`, as one-token stop sequences for the sampler."""
    return tuple((i,) for i in self.eos_ids if i != self.eos_id)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens added (special-token strings in it still map to
    their ids, as a chat template needs)."""
    return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text up to the first end id (`eos_ids`); special tokens are skipped."""
    ids = np.asarray(ids).reshape(-1).tolist()
    for j, i in enumerate(ids):
      if i in self.eos_ids:
        ids = ids[:j]
        break
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def chat(self, prompt: str | Sequence[dict], system: str | None = None) -> str:
    """The text the model sees for a user `prompt` (a string or a list of chat messages).

    With a chat template: `apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)`, `system` first (unless the messages already start with one). Without
    one: the raw prompt, after `system` and a blank line when `system` is given (a message
    list is then an error: it needs a template).
    """
    if isinstance(prompt, str):
      messages = [{"role": "user", "content": prompt}]
    else:
      messages = [dict(m) for m in prompt]
    if system and not (messages and messages[0].get("role") == "system"):
      messages = [{"role": "system", "content": system}] + messages
    if self.has_chat_template:
      return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    if not isinstance(prompt, str):
      raise ValueError("a prompt given as chat messages needs a tokenizer with a chat "
                       "template (this one has none); give the prompt as a string")
    return f"{system}\n\n{prompt}" if system else prompt


def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
  """`eos_token_id` (an int or a list) of `model_dir`/generation_config.json; () if absent."""
  path = os.path.join(os.fspath(model_dir), "generation_config.json")
  if not os.path.isfile(path):
    return ()
  with open(path) as f:
    try:
      eos = json.load(f).get("eos_token_id")
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e
  if eos is None:
    return ()
  return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))


# --------------------------------------------------------------------------- prompt files


def read_rows(path) -> list[tuple[str, dict]]:
  """[(where, row)] of a prompt file; `where` is "line N" (jsonl, 1-based) or "row N"
  (json / parquet / dataset, 0-based) for error messages. `path` may also name a hub
  dataset ("datasets:<id>[/<config>][:<split>]") or be a datasets.Dataset / a list of
  dict rows (rft.data.hf_datasets)."""
  from rft.data import hf_datasets  # pylint: disable=g-import-not-at-top
  if hf_datasets.is_rows(path) or hf_datasets.is_spec(path):
    where = "the dataset" if hf_datasets.is_rows(path) else path
    rows = (hf_datasets.rows_of(path, where) if hf_datasets.is_rows(path)
            else hf_datasets.load_rows(path))
    out = []
    for i, r in enumerate(rows):
      if not isinstance(r, dict):
        raise ValueError(f"{where}, row {i}: expected a dict, got a {type(r).__name__}")
      out.append((f"row {i}", r))
    return out
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".jsonl", ".json", ".parquet"):
    raise ValueError(f"prompt file {path}: unknown extension {ext!r}; use {FORMATS}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} not found (expected {FORMATS})")
  if ext == ".parquet":
    rows = [(f"row {i}", r) for i, r in enumerate(read_parquet(path))]
  else:
    text = read_utf8(path, "prompt file")
    rows = None
    if ext == ".json":
      try:
        data = json.loads(text)
      except json.JSONDecodeError:
        data = None  # maybe JSON lines (what `datasets`' to_json writes)
      if data is not None:
        if not isinstance(data, list):
          raise ValueError(f"prompt file {path}: expected a JSON list of objects, got a "
                           f"{type(data).__name__}")
        rows = [(f"row {i}", r) for i, r in enumerate(data)]
    if rows is None:
      rows = json_lines(text, f"prompt file {path}")
  for where, r in rows:
    if not isinstance(r, dict):
      raise ValueError(f"prompt file {path}, {where}: expected a JSON object, got a "
                       f"{type(r).__name__}")
  if not rows:
    raise ValueError(f"prompt file {path} holds no problems")
  return rows


def read_utf8(path: str, what: str) -> str:
  """The text of file `path`; a ValueError naming `what`, the file, the line and the bytes
  where it is not UTF-8."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{what} {path}: not UTF-8 text at line {line} (byte offset "
                     f"{e.start}: {raw[e.start:e.start + 4]!r}); save it as UTF-8") from None


def json_lines(text: str, where: str) -> list[tuple[str, object]]:
  """[("line n", value)] of JSON-lines text, blank lines skipped; a line that is not JSON
  is a ValueError "<where>, line n: invalid JSON (...)"."""
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append((f"line {n}", json.loads(line)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}, line {n}: invalid JSON ({e})") from None
  return rows


def read_parquet(path: str) -> list[dict]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    return pq.read_table(path).to_pylist()
  except ImportError:
    pass
  try:
    import pandas as pd  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading the parquet file {path} needs `pyarrow` or `pandas` "
                      f"(pip install pyarrow), neither is installed; or convert it to "
                      f".jsonl") from None
  return pd.read_parquet(path).to_dict("records")


_MISSING = object()


def _get(row: dict, key: str):
  """row[key], following dots into nested objects; _MISSING when absent."""
  if key in row:
    return row[key]
  node: Any = row
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _pick_key(rows, key: str, aliases: Sequence[str], what: str, path: str) -> str:
  """`key` if the first row has it, else the first alias it has."""
  where, first = rows[0]
  for k in (key, *[a for a in aliases if a != key]):
    if _get(first, k) is not _MISSING:
      if k != key:
        logging.info("prompt file %s: no %r key; using %r for the %s", path, key, k, what)
      return k
  raise ValueError(f"prompt file {path}, {where}: no {what} key {key!r} (nor {list(aliases)}); "
                   f"keys found: {sorted(first)}. Set config.{what}_key")


def reference_answer(answer: Any) -> str:
  """The target string of an answer field (see the module docstring)."""
  text = str(answer).strip()
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  if "####" in text:
    return text[text.rfind("####") + 4:].strip()
  return text


def _as_messages(prompt: Any) -> list[dict] | None:
  if isinstance(prompt, np.ndarray):
    prompt = prompt.tolist()
  if isinstance(prompt, (list, tuple)) and prompt and all(
      isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
  return None


class PromptFileTask(SplitSampling):
  """Problems of a prompt file, split into train / held-out, tokenized for the sampler.

  Args:
    path: a .jsonl, .json or .parquet file (see the module docstring).
    tokenizer: an :class:`HFTokenizer` (anything with its interface).
    prompt_key, answer_key: the fields holding prompt and answer; when the file's first row
      lacks one, the aliases are tried (PROMPT_ALIASES, ANSWER_ALIASES).
    system_prompt: a system message put before every prompt (None: none).
    use_chat_template: render prompts with the tokenizer's chat template (when it has one);
      False feeds the raw prompt text (after `system_prompt` and a blank line).
    heldout_fraction, split_seed: when rows have no "split" field, a seeded random
      `heldout_fraction` of them (rounded; at least 1 row each side when the fraction is
      > 0 and there are 2 rows or more) is held out. With a "split" field (every row must
      have one) "train" rows train and test / heldout / validation / val / eval / dev rows
      are held out.
    max_prompt_len: the longest tokenized prompt allowed. A longer prompt is a ValueError
      naming the file, its line / row and its length (not truncated: cutting a problem
      statement changes the problem; raise the limit or filter the file).
    max_answer_len: the completion budget in tokens (the evaluation's max_new_tokens).

  Attributes: `prompts` (the prompt text of each row as shown in logs; for chat messages,
  the last message), `chat_prompts` (the exact text tokenized), `answers` (reference
  strings), `split_ids` {"train", "heldout"}, `max_prompt_len` (the padded prompt width:
  the longest tokenized prompt of the file, at most the `max_prompt_len` argument),
  `max_answer_len`, `tokenizer`, `path`.
  """

  completion_separator = "\n  => "  # between prompt and completion in logged samples

  def __init__(self, path, tokenizer, *, prompt_key: str = "prompt", answer_key: str = "answer",
               system_prompt: str | None = None, use_chat_template: bool = True,
               heldout_fraction: float = 0.1, split_seed: int = 0, max_prompt_len: int = 256,
               max_answer_len: int = 512):
    from rft.data import hf_datasets  # pylint: disable=g-import-not-at-top
    self.path = "a dataset object" if hf_datasets.is_rows(path) else os.fspath(path)
    self.tokenizer = tokenizer
    if not 0.0 <= heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction={heldout_fraction}; expected 0 <= fraction < 1")
    if max_prompt_len < 1 or max_answer_len < 1:
      raise ValueError(f"max_prompt_len={max_prompt_len} and max_answer_len={max_answer_len} "
                       f"must be positive")
    rows = read_rows(path if hf_datasets.is_rows(path) else self.path)
    pkey = _pick_key(rows, prompt_key, PROMPT_ALIASES, "prompt", self.path)
    akey = _pick_key(rows, answer_key, ANSWER_ALIASES, "answer", self.path)
    template = use_chat_template and getattr(tokenizer, "has_chat_template", False)
    if use_chat_template and not template:
      logging.warning("prompt file %s: the tokenizer has no chat template; feeding raw "
                      "prompts", self.path)
    self.prompts, self.chat_prompts, self.answers, splits = [], [], [], []
    for where, row in rows:
      prompt, answer = _get(row, pkey), _get(row, akey)
      missing = [k for k, v in ((pkey, prompt), (akey, answer)) if v is _MISSING]
      if missing:
        raise ValueError(f"prompt file {self.path}, {where}: no {' / '.join(map(repr, missing))} "
                         f"key; keys found: {sorted(row)}")
      messages = _as_messages(prompt)
      if messages is None and not isinstance(prompt, str):
        raise ValueError(f"prompt file {self.path}, {where}: {pkey!r} is a "
                         f"{type(prompt).__name__}; expected a string or a list of "
                         f"{{'role', 'content'}} messages")
      if answer is None or isinstance(answer, (dict, list)):
        raise ValueError(f"prompt file {self.path}, {where}: {akey!r} is {answer!r}; expected "
                         f"a string or a number")
      if messages is not None and not template:
        raise ValueError(f"prompt file {self.path}, {where}: the prompt is a list of chat "
                         f"messages, which needs the tokenizer's chat template "
                         f"(use_chat_template=True and a tokenizer that has one)")
      shown = messages[-1]["content"] if messages is not None else prompt
      self.prompts.append(str(shown))
      if template:
        self.chat_prompts.append(tokenizer.chat(messages or prompt, system_prompt))
      else:
        self.chat_prompts.append(f"{system_prompt}\n\n{prompt}" if system_prompt else prompt)
      self.answers.append(reference_answer(answer))
      split = row.get("split")
      splits.append((where, _MISSING if split is None else split))
    self.split_ids = self._make_split(splits, heldout_fraction, split_seed)
    # Tokenize once; every over-long prompt is reported.
    bos = getattr(tokenizer, "bos_id", None)
    self._tokens = []
    for text in self.chat_prompts:
      ids = tokenizer.encode(text)
      if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
      self._tokens.append(ids)
    lengths = np.asarray([len(t) for t in self._tokens])
    if (lengths == 0).any():
      where = rows[int(np.flatnonzero(lengths == 0)[0])][0]
      raise ValueError(f"prompt file {self.path}, {where}: the prompt is empty")
    long = np.flatnonzero(lengths > max_prompt_len)
    if len(long):
      shown = ", ".join(f"{rows[i][0]} ({lengths[i]} tokens)" for i in long[:5])
      raise ValueError(f"prompt file {self.path}: {len(long)} prompt(s) longer than "
                       f"max_prompt_len={max_prompt_len} tokens (chat template included): "
                       f"{shown}{' ...' if len(long) > 5 else ''}. Raise "
                       f"config.max_prompt_len or remove them from the file")
    self.max_prompt_len = int(lengths.max())
    self.max_answer_len = int(max_answer_len)
    logging.info("prompt file %s: %d train / %d held-out problems, prompts of %d-%d tokens",
                 self.path, len(self.split_ids["train"]), len(self.split_ids["heldout"]),
                 lengths.min(), lengths.max())

  def _make_split(self, splits, fraction: float, seed: int) -> dict:
    have = [s is not _MISSING for _, s in splits]
    n = len(splits)
    if any(have):
      held = np.zeros(n, bool)
      for i, (where, s) in enumerate(splits):
        if s is _MISSING:
          raise ValueError(f"prompt file {self.path}, {where}: no 'split' field, but other "
                           f"rows have one (every row needs it, or none)")
        v = str(s).strip().lower()
        if v in HELDOUT_SPLITS:
          held[i] = True
        elif v not in TRAIN_SPLITS:
          raise ValueError(f"prompt file {self.path}, {where}: split={s!r}; expected one of "
                           f"{list(TRAIN_SPLITS + HELDOUT_SPLITS)}")
    else:
      k = int(round(n * fraction))
      if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
      held = np.zeros(n, bool)
      held[np.random.default_rng(seed).permutation(n)[:k]] = True
    if held.all():
      raise ValueError(f"prompt file {self.path}: no training problems (every row is held out)")
    return {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held)}

  def prompt_tokens(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded int32 [n, max_prompt_len] prompt ids and their bool mask."""
    return left_pad([self._tokens[i] for i in ids], self.max_prompt_len,
                    self.tokenizer.pad_id)
