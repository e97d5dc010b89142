"""Hub datasets (and Dataset objects) as prompt sets and LM problem sources, with a stand-in
`datasets` module (no network here)."""
import sys
import types

import pytest

from rft.data import hf_datasets, lm_tasks, prompt_sets


class FakeDataset:
  """Shaped like datasets.Dataset: column_names, len, iteration over dict rows."""

  def __init__(self, rows):
    self._rows = rows
    self.column_names = sorted(rows[0]) if rows else []

  def __iter__(self):
    return iter(self._rows)

  def __len__(self):
    return len(self._rows)


@pytest.fixture
def fake_datasets(monkeypatch):
  calls = []
  tables = {("org/captions", None, "train"): [{"caption": f"a cat {i}"} for i in range(10)]
            + [{"caption": "a cat 3"}],  # a duplicate, dropped
            ("org/math", "main", "test"): [{"question": "1+1", "answer": "2"},
                                           {"question": "2+3", "answer": "5"}]}

  def load_dataset(name, config=None, split=None):
    calls.append((name, config, split))
    if (name, config, split) not in tables:
      raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub\nmore")
    return FakeDataset(tables[(name, config, split)])
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  return calls


def test_parse_spec():
  assert hf_datasets.parse_spec("datasets:org/name") == ("org/name", None, "train")
  assert hf_datasets.parse_spec("datasets:org/name/main:test") == ("org/name", "main", "test")
  assert hf_datasets.parse_spec("datasets:gsm8k:test") == ("gsm8k", None, "test")
  for bad in ("datasets:", "datasets:org//x", "datasets:a/b/c/d"):
    with pytest.raises(ValueError, match="datasets:<id>"):
      hf_datasets.parse_spec(bad)


def test_a_hub_dataset_as_a_prompt_set(fake_datasets):
  ps = prompt_sets.get_prompt_set("datasets:org/captions", key="caption", holdout_fraction=2)
  assert fake_datasets == [("org/captions", None, "train")]
  assert sorted(ps.train + ps.holdout) == sorted(f"a cat {i}" for i in range(10))
  assert len(ps.holdout) == 2 and ps.name == "captions"
  with pytest.raises(ValueError, match=r"datasets:org/captions, row 0: object has no key "
                                       r"'prompt'"):
    prompt_sets.get_prompt_set("datasets:org/captions")
  with pytest.raises(ValueError, match=r"'datasets:org/nope': datasets.load_dataset\('org/nope'"
                                       r", None, split='train'\) failed: FileNotFoundError: "
                                       r"Dataset org/nope doesn't exist on the Hub$"):
    prompt_sets.get_prompt_set("datasets:org/nope")
  # a Dataset object from Python
  ps = prompt_sets.get_prompt_set(FakeDataset([{"prompt": "x"}, {"prompt": "y"}]))
  assert list(ps.train) == ["x", "y"] and not ps.holdout


def test_a_hub_dataset_as_lm_problems(fake_datasets):
  rows = lm_tasks.read_rows("datasets:org/math/main:test")
  assert rows == [("row 0", {"question": "1+1", "answer": "2"}),
                  ("row 1", {"question": "2+3", "answer": "5"})]
  assert lm_tasks.read_rows([{"q": 1}]) == [("row 0", {"q": 1})]
  with pytest.raises(ValueError, match="the dataset: no rows"):
    lm_tasks.read_rows(FakeDataset([]))


def test_without_the_datasets_package_the_error_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
  with pytest.raises(ImportError, match=r"pip install 'rft\[datasets\]'"):
    lm_tasks.read_rows("datasets:org/math")
