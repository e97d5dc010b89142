"""Prompt sets of the text-to-image paper configs (DDPO / AlignProp / PRDP) and prompt files.

* ``animals45`` -- DDPO's ``simple_animals.txt`` (Black et al. 2023), the 45 common
  animals of the small-scale aesthetic setting that DDPO, AlignProp and PRDP train on.
  DDPO's ``simple_animals`` prompt function uses the bare name as the prompt ("cat"), so
  the default template is ``"{animal}"``. The holdout set is AlignProp's
  ``eval_simple_animals.txt``: 6 animals not in the training list.
* ``hpdv2`` -- prompts of the Human Preference Dataset v2 (Wu et al. 2023, HPSv2), read
  from local files (https://huggingface.co/datasets/ymhao/HPDv2): a prompt file, or a
  folder with ``train.json`` (annotation objects with a "prompt") and/or the benchmark
  prompts ``benchmark/{anime,concept-art,paintings,photo}.json`` (lists of strings; the
  4 x 800 evaluation prompts), which form the holdout set when ``train.json`` is there.
* ``pickapic`` -- the captions of Pick-a-Pic (Kirstain et al. 2023,
  https://huggingface.co/datasets/yuvalkirstain/pickapic_v2, parquet files with a
  "caption" column), read from a prompt file or a folder of prompt files, deduplicated.

Prompt files (:func:`load_prompt_file`): ``.txt`` (one prompt per line, blank lines
skipped), ``.json`` (a list of strings or of objects holding ``key``), ``.jsonl`` (one
string or object per line) and ``.parquet`` (the ``key`` column; needs pyarrow).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

import numpy as np

# DDPO ddpo_pytorch/assets/simple_animals.txt, in file order.
ANIMALS45 = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
    "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
    "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat",
    "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly",
    "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo")
# AlignProp assets/eval_simple_animals.txt: unseen animals for evaluation.
ANIMALS_HOLDOUT = ("snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus")
DDPO_TEMPLATE = "{animal}"

HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPT_FILE_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
_WHERE = {
    "hpdv2": "HPDv2 prompts: download https://huggingface.co/datasets/ymhao/HPDv2 (train.json "
             "and/or benchmark/{anime,concept-art,paintings,photo}.json) and give its folder "
             "or one prompt file, e.g. config.prompt_set='hpdv2:/data/HPDv2'",
    "pickapic": "Pick-a-Pic captions: download the parquet files of "
                "https://huggingface.co/datasets/yuvalkirstain/pickapic_v2 (column 'caption') "
                "and give a file or their folder, e.g. "
                "config.prompt_set='pickapic:/data/pickapic_v2/data'",
}


def animals45(template: str = DDPO_TEMPLATE) -> list[str]:
  """The 45 DDPO animals, each formatted with ``template`` (``{animal}`` is the name)."""
  return [template.format(animal=a) for a in ANIMALS45]


# ----------------------------------------------------------------------------- files


def _prompt_of(item, key: str, where: str) -> str:
  if isinstance(item, str):
    return item
  if isinstance(item, dict):
    if key not in item:
      raise ValueError(f"{where}: object has no key {key!r} (keys: {sorted(item)[:10]})")
    item = item[key]
    if isinstance(item, str):
      return item
  raise ValueError(f"{where}: expected a string or an object with a string {key!r}, got "
                   f"{type(item).__name__}")


def load_prompt_file(path: str, *, key: str = "prompt") -> list[str]:
  """Prompts of one file: .txt (a line each), .json (a list of strings or of objects with
  ``key``), .jsonl (a string or object per line) or .parquet (column ``key``).

  Blank prompts are dropped (after stripping whitespace). Errors name the file and the
  line (txt/jsonl), item (json) or row (parquet).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file")
  ext = os.path.splitext(path)[1].lower()
  out: list[str] = []
  if ext == ".txt":
    with open(path, encoding="utf-8") as f:
      out = [line.strip() for line in f]
  elif ext == ".json":
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    out = [_prompt_of(x, key, f"{path}: item {i}").strip() for i, x in enumerate(data)]
  elif ext == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {n}: invalid JSON: {e}") from e
        out.append(_prompt_of(item, key, f"{path}: line {n}").strip())
  elif ext == ".parquet":
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"{path}: reading parquet prompt files needs pyarrow "
                        "(pip install pyarrow)") from e
    table = pq.read_table(path)
    if key not in table.column_names:
      raise ValueError(f"{path}: no column {key!r} (columns: {table.column_names})")
    for row, v in enumerate(table.column(key).to_pylist()):
      if not isinstance(v, str):
        raise ValueError(f"{path}: row {row}: column {key!r} holds {type(v).__name__}, "
                         "not a string")
      out.append(v.strip())
  else:
    raise ValueError(f"{path}: unsupported prompt file type {ext!r}; expected one of "
                     f"{PROMPT_FILE_EXTENSIONS}")
  return [p for p in out if p]


def _dedupe(prompts: Sequence[str]) -> list[str]:
  return list(dict.fromkeys(prompts))


def _prompt_files(folder: str) -> list[str]:
  return sorted(p for ext in PROMPT_FILE_EXTENSIONS
                for p in glob.glob(os.path.join(folder, "*" + ext)))


# ----------------------------------------------------------------------------- sets


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Train and holdout prompts. ``all`` (train then holdout) is the table that rewards and
  samplers index: the prompt id of ``train[i]`` is i, of ``holdout[j]`` is len(train) + j."""

  name: str
  train: tuple[str, ...]
  holdout: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.train:
      raise ValueError(f"prompt set {self.name!r} has no training prompts")

  @property
  def all(self) -> tuple[str, ...]:
    return self.train + self.holdout

  @property
  def holdout_ids(self) -> np.ndarray:
    return np.arange(len(self.train), len(self.train) + len(self.holdout), dtype=np.int32)

  @classmethod
  def split(cls, name: str, prompts: Sequence[str], holdout: float | int = 0, *,
            seed: int = 0) -> "PromptSet":
    """A seeded random split: ``holdout`` is a fraction in [0, 1) or a count of prompts.

    The order inside each part follows ``prompts``.
    """
    prompts = tuple(prompts)
    n = len(prompts)
    if isinstance(holdout, float) and not 0.0 <= holdout < 1.0:
      raise ValueError(f"{name}: holdout fraction {holdout} must be in [0, 1)")
    k = int(round(holdout * n)) if isinstance(holdout, float) else int(holdout)
    if not 0 <= k < n:
      raise ValueError(f"{name}: holdout of {holdout} prompts leaves none of {n} to train on")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return cls(name, tuple(p for i, p in enumerate(prompts) if i not in held),
               tuple(p for i, p in enumerate(prompts) if i in held))


def _hpdv2_folder(folder: str) -> PromptSet | None:
  bench_dir = os.path.join(folder, "benchmark")
  bench_dir = bench_dir if os.path.isdir(bench_dir) else folder
  bench = [os.path.join(bench_dir, f"{s}.json") for s in HPDV2_STYLES]
  bench = [b for b in bench if os.path.isfile(b)]
  benchmark = _dedupe([p for b in bench for p in load_prompt_file(b)])
  train_file = os.path.join(folder, "train.json")
  if os.path.isfile(train_file):
    train = _dedupe(load_prompt_file(train_file))
    held = set(benchmark)
    return PromptSet("hpdv2", tuple(p for p in train if p not in held), tuple(benchmark))
  if benchmark:
    return PromptSet("hpdv2", tuple(benchmark))
  return None


def get_prompt_set(name_or_path: str, *, path: str | None = None, key: str | None = None,
                   holdout_fraction: float | int = 0.0, seed: int = 0,
                   template: str = DDPO_TEMPLATE) -> PromptSet:
  """A prompt set by name ("animals45", "hpdv2", "pickapic") or from a prompt file / folder
  (``config.prompt_set``).

  * "animals45": the 45 DDPO animals formatted with ``template``; holdout = AlignProp's 6
    unseen animals (``holdout_fraction`` / ``seed`` ignored).
  * "hpdv2" / "pickapic": read from ``path``, or from the path after a colon
    ("hpdv2:/data/HPDv2", "pickapic:/data/pickapic_v2/data"): a prompt file, or a folder
    (see the module docstring). FileNotFoundError saying where to get the files when no
    path is given or it does not exist.
  * anything else: a prompt file or a folder of prompt files.

  Except for animals45 and an HPDv2 folder with ``train.json`` (whose benchmark prompts are
  the holdout), ``holdout_fraction`` > 0 (a fraction in [0, 1) or an int count) makes a
  seeded random split (:meth:`PromptSet.split`).
  """
  from rft.data import hf_datasets  # pylint: disable=g-import-not-at-top
  if hf_datasets.is_rows(name_or_path) or hf_datasets.is_spec(name_or_path):
    spec = name_or_path if hf_datasets.is_spec(name_or_path) else None
    where = spec or "the dataset"
    rows = hf_datasets.load_rows(spec) if spec else hf_datasets.rows_of(name_or_path, where)
    prompts = [_prompt_of(r, key or "prompt", f"{where}, row {i}") for i, r in enumerate(rows)]
    label = hf_datasets.parse_spec(spec)[0].split("/")[-1] if spec else "dataset"
    return PromptSet.split(label, _dedupe(prompts), holdout_fraction, seed=seed)
  name = os.fspath(name_or_path)
  head, sep, tail = name.partition(":")
  if sep and head in _WHERE:
    if path is not None and path != tail:
      raise ValueError(f"get_prompt_set: two paths for {head!r}: {tail!r} and path={path!r}")
    name, path = head, tail
  holdout = holdout_fraction
  if name == "animals45":
    return PromptSet("animals45", tuple(template.format(animal=a) for a in ANIMALS45),
                     tuple(template.format(animal=a) for a in ANIMALS_HOLDOUT))
  if name in _WHERE:
    if path is None or not os.path.exists(path):
      raise FileNotFoundError(
          f"prompt set {name!r}: {'no path given' if path is None else repr(path) + ' does not exist'}"
          f". {_WHERE[name]}.")
    key = key or ("caption" if name == "pickapic" else "prompt")
    if name == "hpdv2" and os.path.isdir(path):
      found = _hpdv2_folder(path)
      if found is not None:
        return found if holdout == 0 or found.holdout else PromptSet.split(
            name, found.train, holdout, seed=seed)
  else:
    if path is not None:
      raise ValueError(f"get_prompt_set: path={path!r} given with a file or folder "
                       f"{name!r}; pass one of them")
    path = name
    name = os.path.splitext(os.path.basename(os.path.normpath(name)))[0]
    key = key or "prompt"
  if os.path.isdir(path):
    files = _prompt_files(path)
    if not files:
      raise FileNotFoundError(f"{path}: no prompt files ({', '.join(PROMPT_FILE_EXTENSIONS)})"
                              + (f". {_WHERE[name]}." if name in _WHERE else ""))
    prompts = _dedupe([p for f in files for p in load_prompt_file(f, key=key)])
  elif os.path.isfile(path):
    prompts = load_prompt_file(path, key=key)
    prompts = _dedupe(prompts) if name in _WHERE else prompts
  else:
    raise FileNotFoundError(f"{path}: no such prompt file or folder (and not a known prompt "
                            "set: animals45, hpdv2, pickapic)")
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return PromptSet.split(name, prompts, holdout, seed=seed)
