"""rft.run_record: config differences by hand, and what a start writes or refuses."""
import json
import os

import pytest

from rft import run_record


def test_config_changes_by_hand():
  a = {"lr": 1e-3, "epochs": 10, "model": {"width": 32, "heads": 4}, "tags": [1, 2]}
  b = {"lr": 1e-3, "epochs": 20, "model": {"width": 48, "heads": 4}, "tags": [1, 3], "new": 1}
  assert run_record.flatten(a) == {"lr": 1e-3, "epochs": 10, "model.width": 32,
                                   "model.heads": 4, "tags": [1, 2]}
  assert run_record.config_changes(a, b) == [
      ("model.width", 32, 48), ("new", "<absent>", 1), ("tags", [1, 2], [1, 3])]
  assert ("epochs", 10, 20) in run_record.config_changes(a, b, safe=())
  assert run_record.config_changes(a, a, safe=()) == []


def _start(wd, cfg, **kw):
  return run_record.check_and_record(str(wd), json.dumps(cfg), **kw)


def test_fresh_start_writes_and_a_start_without_checkpoints_redefines(tmp_path):
  assert _start(tmp_path, {"lr": 1}) == []
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1}
  assert not run_record.has_checkpoint(str(tmp_path))
  # No checkpoint yet: a corrected config replaces the stored one.
  assert _start(tmp_path, {"lr": 2}) == []
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 2}
  lines = (tmp_path / "config_history.jsonl").read_text().splitlines()
  assert [json.loads(x)["changed"] for x in lines] == [[], ["lr"]]


def test_resume_refuses_meaning_changes_and_allows_safe_ones(tmp_path):
  _start(tmp_path, {"lr": 1, "epochs": 10, "objective": {"name": "prdp"}})
  os.makedirs(tmp_path / "checkpoints" / "5")
  assert run_record.has_checkpoint(str(tmp_path))
  with pytest.raises(ValueError) as e:
    _start(tmp_path, {"lr": 1, "epochs": 20, "objective": {"name": "ddpo"}})
  msg = str(e.value)
  assert 'config.objective.name: "prdp" (stored) -> "ddpo" (now)' in msg
  assert "config.epochs" not in msg.split("Keys that may")[0]
  lines_before = (tmp_path / "config_history.jsonl").read_text()
  assert len(lines_before.splitlines()) == 1  # a refused start records nothing
  assert _start(tmp_path, {"lr": 1, "epochs": 20, "objective": {"name": "prdp"}}) == [
      ("epochs", 10, 20)]
  got = _start(tmp_path, {"lr": 3, "epochs": 10, "objective": {"name": "prdp"}},
               allow_change=True)
  assert got == [("lr", 1, 3)]
  # The checkpointed run's config is never overwritten; other processes only read.
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1
  assert _start(tmp_path, {"lr": 1, "epochs": 10, "objective": {"name": "prdp"}},
                write=False) == []
  assert len((tmp_path / "config_history.jsonl").read_text().splitlines()) == 3
