"""Hugging Face `datasets` as prompt sources (an optional extra: `pip install rft[datasets]`).

Anywhere rft reads prompts or problems from a file (``config.prompt_set`` for the
text-to-image worlds, ``config.prompt_file`` for LM tasks), a dataset on the hub (or in
the local datasets cache) can stand in for the file:

    datasets:<id>[:<split>]            e.g. "datasets:openai/gsm8k:train" (split default "train")
    datasets:<id>/<config>[:<split>]   a named configuration, e.g. "datasets:openai/gsm8k/main"

and from Python a ``datasets.Dataset`` object (or any sequence of dict rows) can be passed
instead of the path. The rows are read with ``datasets.load_dataset(id, config,
split=split)``; the columns are then picked by the same keys as a file's fields
(``config.prompt_key`` / ``answer_key``; ``key`` for prompt sets).
"""
from __future__ import annotations

from typing import Any

PREFIX = "datasets:"


def is_spec(source: Any) -> bool:
  """Whether `source` names a hub dataset ("datasets:<id>[...]")."""
  return isinstance(source, str) and source.startswith(PREFIX)


def is_rows(source: Any) -> bool:
  """Whether `source` is a datasets.Dataset or a sequence of dict rows (not a path)."""
  if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
    return False
  if hasattr(source, "column_names") and hasattr(source, "__iter__"):
    return True  # a datasets.Dataset (or anything shaped like one)
  return isinstance(source, (list, tuple)) and all(isinstance(r, dict) for r in source)


def parse_spec(spec: str) -> tuple[str, str | None, str]:
  """"datasets:<id>[/<config>][:<split>]" -> (id, config or None, split)."""
  body = spec[len(PREFIX):]
  name, _, split = body.partition(":")
  parts = name.split("/")
  if not name or not all(parts) or len(parts) > 3:
    raise ValueError(f"{spec!r}: a hub dataset is datasets:<id>[/<config>][:<split>], e.g. "
                     "datasets:openai/gsm8k/main:train")
  config = parts[2] if len(parts) == 3 else None
  return "/".join(parts[:2]), config, split or "train"


def load_rows(spec: str) -> list[dict]:
  """The rows (dicts) of the hub dataset `spec` names. ImportError naming the extra when
  `datasets` is not installed; ValueError naming the spec when loading fails."""
  dataset_id, config, split = parse_spec(spec)
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{spec!r} needs the `datasets` package: pip install 'rft[datasets]' "
                      "(or export the rows to a .jsonl / .parquet file)") from None
  try:
    ds = datasets.load_dataset(dataset_id, config, split=split)
  except Exception as e:  # unknown id, split or config; no network and not cached
    raise ValueError(f"{spec!r}: datasets.load_dataset({dataset_id!r}, {config!r}, "
                     f"split={split!r}) failed: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:300]}") from None
  return rows_of(ds, spec)


def rows_of(source: Any, where: str = "dataset") -> list[dict]:
  """A datasets.Dataset (or a sequence of dict rows) as a list of dicts."""
  rows = [dict(r) for r in source]
  if not rows:
    raise ValueError(f"{where}: no rows")
  return rows
