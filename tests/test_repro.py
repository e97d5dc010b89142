"""rft.repro: intervals and verdicts by hand, the run plan, resuming and skipping, the
report from finished runs, and one smoke table end to end."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from rft import config as config_lib
from rft import repro
from rft.repro import report, runner, stats, tables


def test_t_interval_hand_values():
  iv = stats.interval([1.0, 2.0, 3.0])
  # mean 2, sd 1, se 1/sqrt(3), t_{0.975,2} = 4.303
  assert iv.mean == 2.0 and iv.n == 3
  np.testing.assert_allclose([iv.low, iv.high], [2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
  one = stats.interval([0.5])
  assert (one.low, one.high, one.n) == (0.5, 0.5, 1)
  assert stats.interval([]).n == 0
  assert stats.interval([1.0, float("nan"), None, 3.0]).n == 2
  assert stats.t975(25) == stats.t975(20) == 2.086 and stats.t975(100) == 1.96
  with pytest.raises(ValueError, match="at least 2 values"):
    stats.t975(0)


@pytest.mark.parametrize("kind,values,margin,want", [
    ("pos", [0.1, 0.12, 0.11], 0.0, stats.HOLDS),
    ("pos", [-0.1, -0.12, -0.11], 0.0, stats.FAILS),
    ("pos", [-0.1, 0.2, 0.05], 0.0, stats.INCONCLUSIVE),
    ("gt", [0.05], 0.0, stats.INCONCLUSIVE),  # one seed decides nothing
    ("geq", [-0.01, -0.005, -0.012], 0.02, stats.HOLDS),  # worse, but within the margin
    ("geq", [-0.1, -0.12, -0.11], 0.02, stats.FAILS),
    ("geq", [-0.05, 0.03, 0.0], 0.02, stats.INCONCLUSIVE),
])
def test_verdicts(kind, values, margin, want):
  assert stats.verdict(kind, stats.interval(values), margin) == want


def test_every_table_preset_builds_valid_configs(tmp_path):
  """Each run's config loads with its overrides (unknown keys would fail here, before any
  run starts); seeds set the training and the evaluation noise."""
  for t in tables.ALL.values():
    for preset in t.presets:
      runs = runner.plan(t, preset, str(tmp_path))
      assert runs, (t.name, preset)
      runner.check_configs(runs)
      for r in runs:
        assert f"--config.seed={r.seed}" in r.argv
        # ReNO has one seed (its initial noise); the trainers' evaluation noise follows it
        assert (f"--config.eval_seed={r.seed}" in r.argv) == (t.row(r.row).config != "reno")
      assert len(runs) == t.preset(preset).seeds * len(t.preset(preset).rows)


def _run_config(run, config=None):
  """A planned run's config (its file, or `config` instead) with its overrides, less the
  seeds."""
  file = config or run.argv[0].split("=", 1)[1]
  path, _, arg = file.partition(":")
  c = config_lib.load(path, arg or None)
  items = [a[len("--config."):] for a in run.argv
           if a.startswith("--config.") and not a.startswith(("--config.seed=",
                                                               "--config.eval_seed="))]
  return config_lib.apply_overrides(c, items).to_dict()


@pytest.mark.parametrize("variant,preset", [("", "cpu_long"), ("short", "cpu")])
def test_the_main_job_is_t1s_prdp_row(tmp_path, variant, preset):
  """configs/prdp.py's default (the README's first command) is the PRDP row of T1's
  cpu_long preset (120 epochs), and `:short` its cpu row (40 epochs): the table's
  numbers are the main job's."""
  run = runner.plan(tables.get("prdp_table1"), preset, str(tmp_path), rows=["prdp"])[0]
  main_job = config_lib.load("prdp", variant or None).to_dict()
  assert _run_config(run) == main_job
  # and the overrides still say everything: on the earlier default they give the same
  assert _run_config(run, f"{config_lib.CONFIG_DIR}/prdp.py:all_captions") == main_job


def test_prdp_flow_variant_and_nft_default_are_the_flow_tables_rows(tmp_path):
  """configs/prdp.py:flow and configs/nft.py build the configs of the flow method
  table's PRDP and DiffusionNFT rows."""
  for row, name, variant in (("prdp", "prdp", "flow"), ("nft", "nft", None)):
    run = runner.plan(tables.get("flow_methods"), "cpu", str(tmp_path), rows=[row])[0]
    assert _run_config(run) == config_lib.load(name, variant).to_dict(), row
  with pytest.raises(ValueError, match="does not combine with"):
    config_lib.load("prdp", "flow,short")


@pytest.mark.parametrize("table,preset", [
    ("prdp_table1", "cpu_original"), ("prdp_table2", "cpu"), ("prdp_table2", "cpu_original"),
    ("prdp_table2", "accelerator"), ("prdp_table3", "cpu"), ("prdp_table3", "accelerator"), ("prdp_table5", "cpu"),
    ("prdp_table5", "accelerator")])
def test_tables_on_the_original_base_do_not_follow_the_main_jobs_default(tmp_path, table,
                                                                         preset):
  """The presets measured before the main job became T1's row pin what they inherited:
  on the `all_captions` variant (the earlier default) they build the same configs."""
  for run in runner.plan(tables.get(table), preset, str(tmp_path)):
    if not run.argv[0].split("=", 1)[1].split(":")[0].endswith("prdp.py"):
      continue
    file = run.argv[0].split("=", 1)[1]
    earlier = file.replace("prdp.py", "prdp.py:all_captions", 1)
    assert _run_config(run) == _run_config(run, earlier), (table, preset, run.row)


def test_every_named_base_is_shipped():
  """A preset that starts from a bundle other than the default names one that exists
  (rft.pretrained.resolve_dir), and T1's cpu and accelerator presets use the positions
  base while cpu_original keeps the original one."""
  from rft import pretrained
  for t in tables.ALL.values():
    for name, p in t.presets.items():
      d = {**p.common, **{k: v for r in p.rows.values() for k, v in r.items()}}.get("base_dir")
      if d:
        assert pretrained.exists("shapes_base", d), (t.name, name, d)
  t1 = tables.get("prdp_table1")
  assert t1.preset("cpu").common["base_dir"] == "assets/positions"
  assert t1.preset("accelerator").common["base_dir"] == "assets/positions"
  assert t1.preset("cpu_original").common["base_dir"] == ""  # the original base, pinned
  assert pretrained.exists("shapes_base", config_lib.load("prdp").base_dir)  # the main job's
  assert t1.preset("cpu_original").rows["prdp"]["epochs"] == 30
  t2 = tables.get("prdp_table2")  # measured on both bases
  assert t2.preset("cpu").common["base_dir"] == "assets/positions"
  assert t2.preset("cpu_original").common["base_dir"] == ""


def test_every_named_preference_reward_model_is_shipped():
  """The reward_hacking table's preference reward models exist as shipped bundles."""
  from rft import pretrained
  from rft.reward_models import image_model
  for path in tables.PREFERENCE_RMS:
    assert pretrained.exists(image_model.BUNDLE, path), path
    stats = pretrained.load_meta(image_model.BUNDLE, path)["score_stats"]  # standardize
    assert stats["n"] == 2048 and stats["std"] > 0


@pytest.mark.parametrize("table,reference", [("reward_hacking", tables.PAR_REFERENCE),
                                             ("reward_hacking_draft",
                                              tables.DRAFT_PAR_REFERENCE)])
def test_the_par_row_optimises_sigmoid_of_the_single_rms_score_minus_its_reference(
    tmp_path, table, reference):
  """The hacking tables' `par` rows: the planned run's reward is PAR on the `single` row's
  preference RM, sigmoid(r - reference), differentiable (ReNO and DRaFT backpropagate
  it); the table's reference, not the other table's."""
  from rft import main as main_lib
  from rft.data import shapes
  from rft.reward_models import image_model
  from rft.rewards import base as rewards_lib
  t = tables.get(table)
  run, = runner.plan(t, "cpu", str(tmp_path), seeds=1, rows=["par"])
  rest, opts = main_lib.split_reward_options(list(run.argv))
  c = config_lib.load(rest[0].split("=", 1)[1])
  c = config_lib.apply_overrides(c, [a[len("--config."):] for a in rest
                                     if a.startswith("--config.")])
  config_lib.set_reward_options(c, opts)
  assert c.reward == "shapes_preference"
  reward = rewards_lib.build(c.reward, options=c.reward_options.to_dict())
  assert reward.differentiable
  world = shapes.ShapesWorld()
  rng = np.random.default_rng(0)
  ids = world.sample_prompt_ids(rng, 5)
  x = shapes.render_np(world.sample_scenes(rng, ids), rng)
  prompts = {"ids": ids, "tokens": shapes.tokenizer().encode([world.texts[i] for i in ids])}
  raw = image_model.load(tables.PREFERENCE_RMS[0]).score(x, prompts["tokens"])
  np.testing.assert_allclose(reward(x, prompts), 1 / (1 + np.exp(-(raw - reference))),
                             rtol=1e-5, atol=1e-6)


def test_plan_errors(tmp_path):
  t = tables.get("prdp_table1")
  with pytest.raises(ValueError, match="no preset 'gpu'"):
    runner.plan(t, "gpu", str(tmp_path))
  with pytest.raises(ValueError, match=r"--rows \['dpo'\]"):
    runner.plan(t, "cpu", str(tmp_path), rows=["dpo"])
  with pytest.raises(ValueError, match="unknown table 'table9'"):
    tables.get("table9")
  bad = runner.Run("t", "prdp", 0, str(tmp_path), (f"--config={config_lib.CONFIG_DIR}/prdp.py",
                                                    "--config.epoch=3"))
  with pytest.raises(ValueError, match="t row prdp seed 0: .*no key 'epoch'"):
    runner.check_configs([bad])


def _fake_run(path, seed, base, final, kl=(0.1, 0.2)):
  os.makedirs(path, exist_ok=True)
  res = {"epochs": 2, "reward_queries": 1024, "samples_per_epoch": 512, "total_seconds": 60,
         "history": {"0": {"train/alignment": base, "heldout/alignment": 0.3,
                           "train/reward": 0.4},
                     "2": {"train/alignment": final, "heldout/alignment": 0.3,
                           "train/reward": 0.5}},
         "curve": {"1": {"kl_to_ref": kl[0]}, "2": {"kl_to_ref": kl[1]}}}
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(res, f)


def test_report_from_finished_runs(tmp_path):
  t = tables.get("prdp_table1")
  runs = runner.plan(t, "cpu", str(tmp_path), seeds=3, rows=["ddpo", "prdp"])
  gains = {"prdp": [0.12, 0.15, 0.10], "ddpo": [0.02, 0.04, 0.0]}
  for r in runs:
    _fake_run(r.workdir, r.seed, 0.45, 0.45 + gains[r.row][r.seed])
  summary = report.write(t, "cpu", runs, str(tmp_path / "out"))
  v = {x["claim"]: x for x in summary["verdicts"]}
  assert v["PRDP raises seen-caption alignment"]["verdict"] == stats.HOLDS
  # PRDP - DDPO per seed: 0.10, 0.11, 0.10 -> holds
  iv = v["PRDP >= DDPO on seen-caption alignment (within 2 points)"]
  assert iv["verdict"] == stats.HOLDS
  np.testing.assert_allclose(iv["interval"]["mean"], np.mean([0.10, 0.11, 0.10]))
  md = (tmp_path / "out" / "table.md").read_text()
  assert "| PRDP | 57.3 [" in md and "(+12.3 [" in md  # 45 + 12.33 points
  assert "**holds**" in md and "python -m rft.main --config=" in md
  rows = (tmp_path / "out" / "table.csv").read_text().splitlines()
  assert rows[0].startswith("table,preset,row,metric,statistic,mean")
  assert any(",prdp,train/alignment,gain," in r for r in rows)
  assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
  # max_kl reads the per-epoch curve
  assert report._value(runs[0].results(), "max_kl", "final") == 0.2


def test_queries_to_reach_a_gain_by_hand(tmp_path):
  """The flow table reports, per seed, the reward queries at the first evaluation whose
  seen alignment is 5 points above epoch 0 (512 samples per epoch; 'never' otherwise)."""
  t = tables.get("flow_methods")
  runs = runner.plan(t, "cpu", str(tmp_path), seeds=2, rows=["nft", "flow_grpo"])
  curves = {("nft", 0): [0.40, 0.44, 0.46, 0.47], ("nft", 1): [0.40, 0.45, 0.41, 0.50],
            ("flow_grpo", 0): [0.40, 0.41, 0.42, 0.44], ("flow_grpo", 1): [0.40, 0.40, 0.47,
                                                                           0.39]}
  for r in runs:
    os.makedirs(r.workdir, exist_ok=True)
    hist = {str(5 * i): {"train/alignment": v, "heldout/alignment": 0.2, "train/reward": v}
            for i, v in enumerate(curves[r.row, r.seed])}
    curve = {str(e): {"epoch_seconds": 6.0} for e in range(1, 16)} if r.row == "nft" else {}
    with open(os.path.join(r.workdir, "results.json"), "w") as f:
      json.dump({"epochs": 15, "reward_queries": 7680, "samples_per_epoch": 512,
                 "total_seconds": 60, "history": hist, "curve": curve}, f)
  # nft seed 0: +6 points at epoch 10; seed 1: +5 at epoch 5 (the float sum 0.40 + 0.05
  # counts as reached); flow_grpo seed 0 never; seed 1 +7 at epoch 10
  got = {(r.row, r.seed): report.queries_to_reach(r.results(), "train/alignment", 0.05)
         for r in runs}
  # (queries, seconds): nft's curves record 6 s per epoch, flow_grpo's none
  assert got == {("nft", 0): (5120, 60.0), ("nft", 1): (2560, 30.0), ("flow_grpo", 0): None,
                 ("flow_grpo", 1): (5120, 0.0)}
  report.write(t, "cpu", runs, str(tmp_path / "out"))
  md = (tmp_path / "out" / "table.md").read_text()
  assert "first reaches +5 points over its start (epoch or step 0)" in md
  assert "| DiffusionNFT | 5,120 (1.0 min), 2,560 (0.5 min) | 2 of 2 |" in md
  assert "| Flow-GRPO (KL 0.04) | never, 5,120 | 1 of 2 |" in md


def test_finished_runs_are_skipped_and_a_changed_command_is_an_error(tmp_path):
  t = tables.get("prdp_table1")
  runs = runner.plan(t, "smoke", str(tmp_path), seeds=1)
  for r in runs:
    _fake_run(r.workdir, r.seed, 0.4, 0.5)
  said = []
  runner.execute(runs, echo=said.append)  # nothing to run
  assert said == [f"{len(runs)} of {len(runs)} runs already finished"]
  r = runs[0]
  os.remove(os.path.join(r.workdir, "results.json"))
  with open(os.path.join(r.workdir, "command.json"), "w") as f:
    json.dump({"argv": list(r.argv[:-1])}, f)
  with pytest.raises(ValueError, match="started by a different command"):
    runner.execute(runs, echo=said.append)


def test_smoke_table_end_to_end(tmp_path):
  """PRDP's row, two seeds, of the smoke preset through rft.main, then a rerun that only
  writes the report (every run is skipped). (Several rows: test_report_from_finished_runs.)"""
  said = []
  summary = repro.run("prdp_table1", "smoke", str(tmp_path), rows=["prdp"],
                      echo=said.append)
  out = tmp_path / "prdp_table1" / "smoke"
  for f in ("table.md", "table.csv", "curves.png", "summary.json",
            "grids/prdp_train_before_after.png"):
    assert (out / f).exists(), f
  assert {v["verdict"] for v in summary["verdicts"]} <= {stats.HOLDS, stats.FAILS,
                                                         stats.INCONCLUSIVE}
  assert summary["rows"]["prdp"]["train/alignment"]["gain"]["n"] == 2
  said.clear()
  repro.run("prdp_table1", "smoke", str(tmp_path), rows=["prdp"], echo=said.append)
  assert said[0] == "2 of 2 runs already finished"


@pytest.mark.slow
def test_reward_hacking_smoke_rows_with_learned_rewards(tmp_path):
  """ReNO rows of the reward_hacking table through rft.main: one shipped preference
  reward model and the ensemble of three (its members' scores in the history), then the
  report with the held-out alignment of both rows."""
  summary = repro.run("reward_hacking", "smoke", str(tmp_path), rows=["single", "mean"],
                      seeds=1)
  out = tmp_path / "reward_hacking" / "smoke"
  for f in ("table.md", "curves.png", "grids/single_heldout_before_after.png"):
    assert (out / f).exists(), f
  for row in ("single", "mean"):
    assert summary["rows"][row]["heldout/alignment"]["final"]["n"] == 1
  res = json.load(open(tmp_path / "reward_hacking" / "smoke" / "mean" / "seed0" /
                       "results.json"))
  assert {f"heldout/reward_ensemble_member{k}" for k in range(3)} <= set(res["history"]["0"])


def test_a_run_killed_by_a_signal_is_resumed_and_an_error_is_not(tmp_path, monkeypatch):
  t = tables.get("prdp_table1")
  run = runner.plan(t, "smoke", str(tmp_path), seeds=1, rows=["prdp"])[0]
  calls = []

  def fake(codes):
    def run_(cmd, **kw):
      calls.append(cmd)
      code = codes[len(calls) - 1]
      if code == 0:
        _fake_run(run.workdir, 0, 0.4, 0.5)
      return type("P", (), {"returncode": code})()
    return run_

  monkeypatch.setattr(runner.subprocess, "run", fake([-6, 0]))  # SIGABRT, then done
  said = []
  runner.execute([run], echo=said.append)
  assert len(calls) == 2 and run.done
  assert any("killed by signal 6; resuming" in s for s in said)
  os.remove(os.path.join(run.workdir, "results.json"))
  calls.clear()
  monkeypatch.setattr(runner.subprocess, "run", fake([1]))
  with pytest.raises(RuntimeError, match="prdp seed 0 failed .exit 1.; log: "):
    runner.execute([run], echo=said.append)
  assert len(calls) == 1


def test_table_commands_are_shell_lines_that_parse_back():
  import shlex
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = [f"--config={root}/configs/prdp.py", "--workdir=/tmp/w x",
          "--config.finetune.trainable=^unet/(mid|down2|up2)", "--config.lr=0.0003"]
  line = report.shell_command(argv)
  assert line.startswith("python -m rft.main --config=configs/prdp.py ")
  assert shlex.split(line)[4:] == argv[1:]  # the regex and the space survive the shell


def test_seed_lists():
  assert runner.seed_list(None, 3) == [0, 1, 2]
  assert runner.seed_list(2, 3) == [0, 1]
  assert runner.seed_list("4", 3) == [0, 1, 2, 3]
  assert runner.seed_list("3-5", 3) == [3, 4, 5]
  assert runner.seed_list("0,2,4", 3) == [0, 2, 4]
  assert runner.seed_list("0-0", 3) == [0] and runner.seed_list("2,", 3) == [2]
  for bad in ("x", "5-3", "1,1", "-1,2"):
    with pytest.raises(ValueError, match="--seeds"):
      runner.seed_list(bad, 3)
  with pytest.raises(ValueError, match="count of seeds.*--seeds 0-0 or --seeds 0,"):
    runner.seed_list("0", 3)  # seed 0 alone is a range or a list, not the count 0
  t = tables.get("prdp_table1")
  runs = runner.plan(t, "cpu", "/w", seeds="3-4", rows=["prdp"])
  assert [r.seed for r in runs] == [3, 4]
  assert runs[0].workdir == "/w/prdp_table1/cpu/prdp/seed3"
  assert "--config.seed=3" in runs[0].argv and "--config.eval_seed=3" in runs[0].argv


def test_a_table_is_reported_and_extended_from_its_records(tmp_path):
  """The report keeps each run's record in the table's folder; with the run folders gone
  the runs still count as finished and the report is the same; more seeds extend it; a
  record made by a different command is an error."""
  import shutil
  t = tables.get("prdp_table1")
  runs = runner.plan(t, "cpu", str(tmp_path), seeds=2, rows=["ddpo", "prdp"])
  gains = {"prdp": [0.12, 0.15, 0.10], "ddpo": [0.02, 0.04, 0.0]}
  for r in runs:
    _fake_run(r.workdir, r.seed, 0.45, 0.45 + gains[r.row][r.seed])
  out = str(tmp_path / "prdp_table1" / "cpu")
  first = report.write(t, "cpu", runs, out)
  for row in ("prdp", "ddpo"):
    shutil.rmtree(tmp_path / "prdp_table1" / "cpu" / row)
    assert (tmp_path / "prdp_table1" / "cpu" / "records" / row / "seed1.json").exists()
  again = runner.plan(t, "cpu", str(tmp_path), seeds=2, rows=["ddpo", "prdp"])
  assert all(r.done and not r.has_results for r in again)
  assert report.write(t, "cpu", again, out) == first
  said = []
  runner.execute(again, echo=said.append)
  assert said == ["4 of 4 runs already finished"]
  # a third seed: its runs are to do; once finished the table has three seeds
  more = runner.plan(t, "cpu", str(tmp_path), seeds="0-2", rows=["ddpo", "prdp"])
  assert [r.done for r in more] == [True, True, True, True, False, False]
  for r in more[4:]:
    _fake_run(r.workdir, r.seed, 0.45, 0.45 + gains[r.row][r.seed])
  summary = report.write(t, "cpu", more, out)
  assert summary["rows"]["prdp"]["train/alignment"]["gain"]["n"] == 3
  csv_rows = (tmp_path / "prdp_table1" / "cpu" / "table.csv").read_text().splitlines()
  assert csv_rows[0].endswith(",values,seed_ids")
  assert any(",prdp,train/alignment,gain," in r and r.endswith('"[0, 1, 2]"') for r in csv_rows)
  # the same seed under another command (here another learning rate)
  changed = runner.plan(t, "cpu", str(tmp_path), seeds=1, rows=["prdp"])[0]
  changed = dataclasses.replace(changed, argv=changed.argv + ("--config.lr=0.1",))
  with pytest.raises(ValueError, match=r"record .*seed0.json was made by a different command"):
    changed.done


def test_pooled_reports_equal_one_report_of_all_seeds(tmp_path):
  """Seeds 0-1 reported in one folder and seed 2 in another, pooled, give the intervals
  and verdicts of one report over seeds 0-2; an old table.csv without seed ids is read as
  seeds 0..n-1; a seed in two reports and reports of different presets are errors."""
  from rft.repro import pool
  t = tables.get("prdp_table1")
  gains = {"prdp": [0.12, 0.15, 0.10], "ddpo": [0.02, 0.04, 0.0]}

  def report_of(workdir, seeds):
    runs = runner.plan(t, "cpu", str(workdir), seeds=seeds, rows=["ddpo", "prdp"])
    for r in runs:
      _fake_run(r.workdir, r.seed, 0.45 + 0.01 * r.seed, 0.45 + 0.01 * r.seed
                + gains[r.row][r.seed])
    return report.write(t, "cpu", runs, str(workdir / "out"))

  whole = report_of(tmp_path / "all", 3)
  report_of(tmp_path / "a", "0-1")
  report_of(tmp_path / "b", "2-2")  # "2" alone would be a count (seeds 0-1)
  pooled = pool.write(pool.pool([str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")]),
                      str(tmp_path / "pooled"))
  assert [(v["claim"], v["verdict"]) for v in pooled["verdicts"]] == [
      (v["claim"], v["verdict"]) for v in whole["verdicts"]]
  for got, want in zip(pooled["verdicts"], whole["verdicts"]):
    np.testing.assert_allclose([got["interval"][k] for k in ("mean", "low", "high")],
                               [want["interval"][k] for k in ("mean", "low", "high")])
  for row in ("prdp", "ddpo"):
    for m in ("train/alignment", "heldout/alignment", "train/reward"):
      for st in ("base", "final", "gain"):
        np.testing.assert_allclose(pooled["rows"][row][m][st]["mean"],
                                   whole["rows"][row][m][st]["mean"])
  assert "(n=3)" in (tmp_path / "pooled" / "table.md").read_text()
  # an older table.csv (no seed_ids column) is read as seeds 0..n-1
  old = tmp_path / "old.csv"
  lines = (tmp_path / "a" / "out" / "table.csv").read_text().splitlines()
  old.write_text("\n".join(ln.rsplit(",", 1)[0] if i == 0 else ln.rsplit(",\"[", 1)[0]
                           for i, ln in enumerate(lines)) + "\n")
  read = pool.read_values(str(old))
  assert read["assumed_seeds"] and set(read["values"][("prdp", "train/alignment", "gain")]) == {0, 1}
  again = pool.write(pool.pool([str(old), str(tmp_path / "b" / "out")]), str(tmp_path / "p2"))
  assert again["verdicts"] == pooled["verdicts"]
  assert "does not name its seeds" in (tmp_path / "p2" / "table.md").read_text()
  with pytest.raises(ValueError, match=r"seed\(s\) \[0, 1\] of .* are in two reports"):
    pool.pool([str(tmp_path / "a" / "out"), str(tmp_path / "all" / "out")])
  other = tmp_path / "other.csv"
  other.write_text((tmp_path / "b" / "out" / "table.csv").read_text().replace(",cpu,", ",cpu_long,"))
  with pytest.raises(ValueError, match="different tables or presets"):
    pool.pool([str(tmp_path / "a" / "out"), str(other)])


def test_lm_objectives_table_reads_lm_runs(tmp_path):
  """The LM table reads the LM loop's results.json (steps, per-step curve with
  step_seconds, completions as reward queries); its percentages are exact match."""
  t = tables.get("lm_objectives")
  runs = runner.plan(t, "cpu", str(tmp_path), seeds=2)
  assert [r.row for r in runs] == ["grpo", "rebel", "copg"] * 2
  assert "--config.steps=50" in runs[0].argv and "--config.eval_seed=1" in runs[3].argv
  sampled = {"grpo": (0.43, 0.50, 0.56), "rebel": (0.43, 0.55, 0.60),
             "copg": (0.43, 0.52, 0.54)}
  for r in runs:
    os.makedirs(r.workdir, exist_ok=True)
    hist = {str(25 * i): {"heldout/accuracy_sampled": v + 0.01 * r.seed,
                          "heldout/accuracy_greedy": 0.82, "train/accuracy_sampled": v}
            for i, v in enumerate(sampled[r.row])}
    curve = {str(s): {"completions": 1024, "step_seconds": 3.0} for s in range(1, 51)}
    with open(os.path.join(r.workdir, "results.json"), "w") as f:
      json.dump({"steps": 50, "reward_queries": 51200, "samples_per_epoch": 1024,
                 "total_seconds": 180, "history": hist, "curve": curve}, f)
  summary = report.write(t, "cpu", runs, str(tmp_path / "out"))
  md = (tmp_path / "out" / "table.md").read_text()
  assert "percentages are points of exact match" in md
  # +10 points: grpo at step 50 (0.56 - 0.43 = 13), rebel at 25 (12), copg at 50 (11)
  assert "| GRPO | 51,200 (2.5 min), 51,200 (2.5 min) | 2 of 2 |" in md
  assert "| REBEL (eta 1, all pairs) | 25,600 (1.2 min), 25,600 (1.2 min) | 2 of 2 |" in md
  v = {c["claim"]: c for c in summary["verdicts"]}
  iv = v["REBEL >= GRPO on held-out sampled accuracy (within 2 points)"]
  np.testing.assert_allclose(iv["interval"]["mean"], 0.04)  # 0.17 - 0.13 on both seeds
  assert iv["verdict"] == stats.HOLDS


def test_reward_model_table_reads_trainer_results(tmp_path):
  """reward_model_losses reads the reward-model trainer's results.json: no reward
  queries ('–', curves against training steps), minutes from train_seconds_this_run;
  the preset picks the world through the config variant."""
  t = tables.get("reward_model_losses")
  runs = runner.plan(t, "shapes", str(tmp_path), seeds=2)
  assert [r.argv[0].rsplit("/", 1)[1] for r in runs[:3]] == [
      "reward_model.py:shapes", "reward_model.py:regression,shapes",
      "reward_model.py:both,shapes"]
  final = {"bt": 0.86, "regression": 0.79, "both": 0.89}
  for r in runs:
    os.makedirs(r.workdir, exist_ok=True)
    hist = {"0": {"heldout/pair_accuracy": 0.5, "train/pair_accuracy": 0.5,
                  "heldout/ece": 0.1},
            "2000": {"heldout/pair_accuracy": final[r.row] + 0.01 * r.seed,
                     "train/pair_accuracy": 0.9, "heldout/ece": 0.03}}
    with open(os.path.join(r.workdir, "results.json"), "w") as f:
      json.dump({"history": hist, "train_seconds_this_run": 540.0}, f)
  summary = report.write(t, "shapes", runs, str(tmp_path / "out"))
  md = (tmp_path / "out" / "table.md").read_text()
  assert "| Bradley-Terry on pairs | 86.5 [" in md and "| 2 | – | 9.0 |" in md
  assert "percentages are points of pair accuracy" in md
  v = {c["claim"]: c for c in summary["verdicts"]}
  iv = v["BT + regression is more accurate than BT alone (held-out pairs)"]
  np.testing.assert_allclose(iv["interval"]["mean"], 0.03)
  assert iv["verdict"] == stats.HOLDS
  assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
