"""rft.data.prompt_sets: the DDPO animals, prompt files of every format, splits, named sets."""
from __future__ import annotations

import builtins
import json
import os

import pytest

from rft.data import prompt_sets as ps


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def test_animals45():
  a = ps.animals45()
  assert len(a) == 45 == len(set(a))
  assert a[:3] == ["cat", "dog", "horse"] and a[-1] == "kangaroo"
  assert ps.animals45("a photo of a {animal}")[1] == "a photo of a dog"
  s = ps.get_prompt_set("animals45")
  assert s.train == tuple(a) and len(s.holdout) == 6
  assert not set(s.holdout) & set(s.train)
  assert s.all == s.train + s.holdout and list(s.holdout_ids) == list(range(45, 51))
  assert ps.get_prompt_set("animals45", template="{animal}, 4k").train[0] == "cat, 4k"


def test_txt_json_jsonl(tmp_path):
  assert ps.load_prompt_file(_write(tmp_path / "p.txt", " a cat \n\nA dog\n")) == ["a cat",
                                                                                  "A dog"]
  assert ps.load_prompt_file(_write(tmp_path / "p.json", json.dumps(["x", " y"]))) == ["x", "y"]
  objs = json.dumps([{"prompt": "x", "id": 1}, {"prompt": "z"}])
  assert ps.load_prompt_file(_write(tmp_path / "o.json", objs)) == ["x", "z"]
  cap = json.dumps([{"caption": "c"}])
  assert ps.load_prompt_file(_write(tmp_path / "c.json", cap), key="caption") == ["c"]
  jl = '{"prompt": "a"}\n\n"b"\n{"prompt": "c"}\n'
  assert ps.load_prompt_file(_write(tmp_path / "p.jsonl", jl)) == ["a", "b", "c"]


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    ps.load_prompt_file(str(tmp_path / "nope.txt"))
  with pytest.raises(ValueError, match=r"bad.jsonl: line 2: invalid JSON"):
    ps.load_prompt_file(_write(tmp_path / "bad.jsonl", '"a"\n{oops\n'))
  with pytest.raises(ValueError, match=r"k.jsonl: line 1: object has no key 'prompt'"):
    ps.load_prompt_file(_write(tmp_path / "k.jsonl", '{"text": "a"}\n'))
  with pytest.raises(ValueError, match=r"i.json: item 1: expected a string"):
    ps.load_prompt_file(_write(tmp_path / "i.json", '["a", 3]'))
  with pytest.raises(ValueError, match=r"d.json: expected a JSON list"):
    ps.load_prompt_file(_write(tmp_path / "d.json", '{"a": 1}'))
  with pytest.raises(ValueError, match=r"unsupported prompt file type '.csv'"):
    ps.load_prompt_file(_write(tmp_path / "p.csv", "a\n"))


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.table({"caption": ["a", "b", "a"], "n": [1, 2, 3]}), path)
  assert ps.load_prompt_file(path, key="caption") == ["a", "b", "a"]
  with pytest.raises(ValueError, match=r"p.parquet: no column 'prompt'"):
    ps.load_prompt_file(path)
  bad = str(tmp_path / "bad.parquet")
  pq.write_table(pa.table({"prompt": ["a", None]}), bad)
  with pytest.raises(ValueError, match=r"bad.parquet: row 1"):
    ps.load_prompt_file(bad)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_pyarrow(name, *a, **k):
    if name.startswith("pyarrow"):
      raise ImportError("No module named 'pyarrow'")
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_pyarrow)
  path = _write(tmp_path / "p.parquet", "not really parquet")
  with pytest.raises(ImportError, match=r"p.parquet: reading parquet prompt files needs pyarrow"):
    ps.load_prompt_file(path)


def test_split():
  prompts = [f"p{i}" for i in range(20)]
  a = ps.PromptSet.split("x", prompts, 0.25, seed=3)
  assert len(a.holdout) == 5 and len(a.train) == 15
  assert sorted(a.all) == sorted(prompts)
  assert list(a.train) == [p for p in prompts if p in a.train]  # order kept
  assert ps.PromptSet.split("x", prompts, 0.25, seed=3) == a
  assert ps.PromptSet.split("x", prompts, 0.25, seed=4).holdout != a.holdout
  assert len(ps.PromptSet.split("x", prompts, 3).holdout) == 3
  assert ps.PromptSet.split("x", prompts).holdout == ()
  with pytest.raises(ValueError, match="must be in"):
    ps.PromptSet.split("x", prompts, 1.5)
  with pytest.raises(ValueError, match="leaves none"):
    ps.PromptSet.split("x", prompts, 20)


def test_named_sets_need_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'hpdv2'.*no path given.*ymhao/HPDv2"):
    ps.get_prompt_set("hpdv2")
  with pytest.raises(FileNotFoundError, match=r"'pickapic'.*does not exist.*pickapic_v2"):
    ps.get_prompt_set("pickapic:" + str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=r"no such prompt file or folder"):
    ps.get_prompt_set(str(tmp_path / "missing.txt"))


def test_hpdv2_folder(tmp_path):
  d = tmp_path / "HPDv2"
  os.makedirs(d / "benchmark")
  for i, style in enumerate(ps.HPDV2_STYLES):
    _write(d / "benchmark" / f"{style}.json", json.dumps([f"{style} {j}" for j in range(3)]))
  only_bench = ps.get_prompt_set("hpdv2", path=str(d))
  assert len(only_bench.train) == 12 and only_bench.holdout == ()
  assert len(ps.get_prompt_set("hpdv2", path=str(d), holdout_fraction=0.5).holdout) == 6
  train = [{"prompt": "t0", "image_path": ["a.jpg"]}, {"prompt": "t1"}, {"prompt": "t0"},
           {"prompt": "anime 0"}]
  _write(d / "train.json", json.dumps(train))
  s = ps.get_prompt_set("hpdv2:" + str(d))
  assert s.train == ("t0", "t1") and len(s.holdout) == 12 and s.holdout[0] == "anime 0"


def test_pickapic_and_generic_files(tmp_path):
  d = tmp_path / "pick"
  os.makedirs(d)
  _write(d / "a.jsonl", '{"caption": "x"}\n{"caption": "y"}\n')
  _write(d / "b.jsonl", '{"caption": "x"}\n{"caption": "z"}\n')
  s = ps.get_prompt_set("pickapic", path=str(d))
  assert s.name == "pickapic" and s.train == ("x", "y", "z")
  f = _write(tmp_path / "mine.txt", "\n".join(f"q{i}" for i in range(10)))
  g = ps.get_prompt_set(f, holdout_fraction=0.2, seed=1)
  assert g.name == "mine" and len(g.train) == 8 and len(g.holdout) == 2
  with pytest.raises(ValueError, match="pass one of them"):
    ps.get_prompt_set(f, path=f)
  empty = tmp_path / "empty"
  os.makedirs(empty)
  with pytest.raises(FileNotFoundError, match="no prompt files"):
    ps.get_prompt_set(str(empty))
