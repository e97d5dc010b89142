"""The LM online loop end to end: smoke runs of the GRPO-family configs, resume, errors."""
import json

import jax
import numpy as np
import pytest

from rft import pretrained
from tests.helpers import run_main

# CI runs the plain GRPO smoke and GSPO with the KL term end to end; DAPO runs three times
# in test_resumed_run_continues_the_same_curve. Dr.GRPO, RLOO, RAFT, REBEL and CoPG differ
# only in their advantage / loss kernels (hand-computed in test_grpo.py and
# test_lm_pair_objectives.py), so their end-to-end smoke runs are in the slow set; REBEL's
# update of the arithmetic LM runs in CI in process (test_pair_objective_updates_train_the_lm;
# CoPG's in the slow set).
VARIANTS = ["", pytest.param("dapo", marks=pytest.mark.slow),
            pytest.param("dr_grpo", marks=pytest.mark.slow), "gspo,kl",
            pytest.param("rloo", marks=pytest.mark.slow),
            pytest.param("raft", marks=pytest.mark.slow),
            pytest.param("rebel", marks=pytest.mark.slow),
            pytest.param("copg", marks=pytest.mark.slow)]
OBJECTIVE = {"raft": "raft", "rebel": "rebel", "copg": "copg"}  # variant -> record


def _results(workdir):
  with open(workdir / "results.json") as f:
    return json.load(f)


@pytest.mark.parametrize("variant", VARIANTS)
def test_grpo_smoke_runs(variant, tmp_path):
  wd = tmp_path / "run"
  p = run_main("configs/grpo.py:smoke" + (f",{variant}" if variant else ""), wd)
  if not variant:
    from tests.test_tensorboard_console import check_grpo_smoke
    check_grpo_smoke(p, wd)  # hparams, lr by hand, throughput, texts, console
  r = _results(wd)
  assert r["objective"] == OBJECTIVE.get(variant, "grpo")
  assert set(r["history"]) == {"0", "2"}
  # per-step curve: completions scored and seconds (rft.repro's queries and minutes)
  assert set(r["curve"]) == {"1", "2"}
  per_step = [c["completions"] for c in r["curve"].values()]
  assert r["reward_queries"] == sum(per_step) > 0
  assert r["samples_per_epoch"] == round(sum(per_step) / 2)
  assert all(c["step_seconds"] > 0 for c in r["curve"].values())
  assert r["total_seconds"] >= r["train_seconds_this_run"]
  for h in r["history"].values():
    for k in ("train/accuracy_greedy", "heldout/accuracy_sampled"):
      assert 0.0 <= h[k] <= 1.0
  assert (wd / "checkpoints").is_dir()
  _, base, _ = pretrained.load_arith_base()
  _, tuned, meta = pretrained.load_arith_base(str(wd))
  assert meta["objective"] == r["objective"]
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base),
                                                           jax.tree.leaves(tuned)))
  assert moved > 0


def test_multi_reward_normalize_then_sum_runs(tmp_path):
  """Two reward terms normalised separately; one of them an ensemble of two text rewards
  configured through config.reward_options (which the LM loop passes to the rewards)."""
  wd = tmp_path / "run"
  cfg = tmp_path / "ensemble_grpo.py"
  cfg.write_text(
      "from rft import config as config_lib\n"
      "def get_config(arg=None):\n"
      "  c = config_lib.load('grpo', 'smoke')\n"
      "  c.reward_options = {'ensemble': {'members': 'exact_match,math_answer',\n"
      "                                   'combine': 'min'}}\n"
      "  return c\n")
  run_main(str(cfg), wd, "--config.reward=ensemble:1,math_answer:0.5",
           "--config.reward_aggregation=normalize_then_sum", "--config.eval_every=0")
  assert _results(wd)["steps"] == 2
  with open(wd / "config.json") as f:
    assert json.load(f)["reward_options"]["ensemble"]["combine"] == "min"
  p = run_main("configs/grpo.py:smoke", tmp_path / "bad", "--config.reward_aggregation=mean",
               check=False)
  assert p.returncode != 0 and "config.reward_aggregation='mean'" in p.stderr


def test_resumed_run_continues_the_same_curve(tmp_path):
  """DAPO (dynamic sampling draws extra rounds): 2 steps straight == 1 step, stop, resume."""
  args = ["--config.eval_every=0"]
  run_main("configs/grpo.py:smoke,dapo", tmp_path / "a", *args)
  run_main("configs/grpo.py:smoke,dapo", tmp_path / "b", "--config.steps=1", *args)
  run_main("configs/grpo.py:smoke,dapo", tmp_path / "b", *args)
  _, a, _ = pretrained.load_arith_base(str(tmp_path / "a"))
  _, b, _ = pretrained.load_arith_base(str(tmp_path / "b"))
  # the resumed run's curve and counts carry the first run's step (extra rounds included)
  ra, rb = _results(tmp_path / "a"), _results(tmp_path / "b")
  assert ([c["completions"] for c in rb["curve"].values()]
          == [c["completions"] for c in ra["curve"].values()])
  assert rb["reward_queries"] == ra["reward_queries"]
  assert rb["total_seconds"] > rb["total_seconds_this_run"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bad_config_values_are_clear_errors(tmp_path):
  p = run_main("configs/grpo.py:smoke", tmp_path / "x", "--config.group_size=1", check=False)
  assert p.returncode != 0 and "config.group_size=1" in p.stderr
  p = run_main("configs/grpo.py:smoke", tmp_path / "y", "--config.objective.loss=ppo",
               check=False)
  assert p.returncode != 0 and "'ppo'" in p.stderr and "dapo" in p.stderr
  p = run_main("configs/grpo.py:smoke", tmp_path / "z", "--config.minibatches=3", check=False)
  assert p.returncode != 0 and "config.minibatches=3" in p.stderr


def test_pretrain_arith_smoke_writes_a_loadable_bundle(tmp_path):
  run_main("configs/pretrain_arith.py:smoke", tmp_path)
  cfg, params, meta = pretrained.load_arith_base(str(tmp_path))
  assert cfg.hidden_size == 32 and cfg.num_layers == 1
  assert set(meta["results"]) >= {"train/accuracy_greedy", "heldout/accuracy_greedy"}
  assert meta["world"]["ops"] == "+-*"


def test_dynamic_sampling_that_runs_out_of_rounds_trains_on_what_it_kept(tmp_path):
  """max_rounds=1 with 2 prompts x 4: some steps keep fewer than 2 groups (or none);
  the run must finish without indexing past the batch."""
  wd = tmp_path / "run"
  run_main("configs/grpo.py:smoke,dapo", wd, "--config.objective.max_rounds=1",
           "--config.steps=4", "--config.eval_every=0")
  assert _results(wd)["steps"] == 4
  from rft import tb_events
  groups = [v for _, v in tb_events.read_scalars(str(wd))["train/groups_in_batch"]]
  assert len(groups) == 4 and all(0 <= g <= 2 for g in groups)


# CoPG's update runs through the same pair path (lm_pairs) as REBEL's; its loss and
# gradient are hand-computed in test_lm_pair_objectives.py, so its loop run is slow-only.
@pytest.mark.parametrize("variant", ["rebel", pytest.param("copg", marks=pytest.mark.slow)])
def test_pair_objective_updates_train_the_lm(variant):
  """The records' entries through lm_rl.make_update on the shipped arithmetic LM: the first
  update sees ratio 1 exactly, the loss is the hand formula's value at θ = θ_old, and
  three updates lower it."""
  from rft import config as config_lib
  from rft.objectives import lm_pairs, registry
  from rft.train import lm_rl
  from rft.train.state import TrainState, make_optimizer
  cfg, base, _ = pretrained.load_arith_base()
  config = config_lib.load("grpo", f"smoke,{variant}")
  obj = lm_rl.validate(config)
  kw = obj.settings(config.objective)
  tx = make_optimizer(1e-5, 10, schedule="constant")  # Adam's first steps are sign-like
  update = lm_rl.make_update(cfg, config, tx)
  rng = np.random.default_rng(0)
  N, Lp, Lc, G = 8, 5, 4, config.group_size
  rewards = np.array([1, 0, 0, 1, 1, 1, 0, 1], np.float32)
  entries, _ = obj.prepare(config, kw, {"rewards": rewards, "truncated": np.zeros(N, bool)},
                           G, None)
  completion_mask = (np.arange(Lc)[None] < rng.integers(1, Lc + 1, N)[:, None])
  batch = {"prompt": rng.integers(1, cfg.vocab_size, (N, Lp)).astype(np.int32),
           "prompt_mask": np.ones((N, Lp), bool),
           "completion": rng.integers(1, cfg.vocab_size, (N, Lc)).astype(np.int32),
           "completion_mask": completion_mask.astype(np.float32), **entries,
           "step_loss_tokens": np.full(N, completion_mask.sum(), np.float32)}
  T = config.sampling.temperature
  old, _ = jax.jit(lambda p, b: lm_rl.policy_log_probs(cfg, T, p, b))(base, batch)
  batch["old_log_probs"] = old
  ref = np.asarray(old) - 0.5 * completion_mask  # a reference 0.5 nats below per token
  if obj.uses_reference(kw):
    batch["ref_log_probs"] = ref
  # At θ = θ_old the score of a row is 0 (REBEL) or β · 0.5 · length (CoPG).
  scores = (0.0 if variant == "rebel" else kw["beta"] * 0.5 * completion_mask.sum(1))
  want, _ = lm_pairs.pair_regression(np.zeros(N) + scores, rewards, entries["pair_group"],
                                     entries["loss_weight"] > 0)
  state = TrainState.create(base, tx)
  losses = []
  for i in range(4):
    state, m = update(state, batch)
    if i == 0:
      assert float(m["ratio_mean"]) == 1.0
      np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
      assert float(m["pairs"]) == 2 * G * (G - 1) / 2
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0], losses
  assert registry.lm(variant) is obj
