"""The online loop end to end: every config's smoke run, resume, LoRA, and bad input."""
import json
import math

import jax
import numpy as np
import pytest

from rft import pretrained
from rft.train import diffusion_rl
from tests.helpers import DEFAULT_XLA, run_main

# DRaFT-LV and AlignProp are variants of DRaFT's reward-backprop kind: their plain smoke
# runs are in the slow set (DRaFT-LV's rollout and gradient are tested in
# test_trajectory_grads.py; AlignProp runs end to end with LoRA below).
ONLINE_CONFIGS = ["prdp", "ddpo", "draft", pytest.param("draft:lv", marks=pytest.mark.slow),
                  pytest.param("alignprop", marks=pytest.mark.slow), "raft"]


def _results(workdir):
  with open(workdir / "results.json") as f:
    return json.load(f)


@pytest.mark.parametrize("name", ONLINE_CONFIGS)
def test_smoke_run_writes_results_checkpoint_and_model(name, tmp_path):
  config, _, arg = name.partition(":")
  wd = tmp_path / "run"
  from tests import test_tensorboard_console as tbc
  extra = tbc.PRDP_SMOKE_ARGS if name == "prdp" else ()
  p = run_main(f"configs/{config}.py:smoke" + (f",{arg}" if arg else ""), wd, *extra,
               env=DEFAULT_XLA if name == "ddpo" else None)
  if name == "prdp":
    tbc.check_prdp_smoke(p, wd)  # hparams, lr by hand, throughput, grids, console
  r = _results(wd)
  assert r["objective"] == {"draft:lv": "draft_lv"}.get(name, config)
  hist = r["history"]
  assert set(hist) == {"0", "2"}  # base model and final evaluation
  for h in hist.values():
    for k in ("train/alignment", "heldout/alignment", "heldout/reward"):
      assert 0.0 <= h[k] <= 1.0 and math.isfinite(h[k])
  assert r["reward_queries"] > 0
  if name in ("prdp", "ddpo"):  # a trajectory epoch's time, phase by phase
    for m in r["curve"].values():
      phases = [m[k] for k in ("seconds_rollout", "seconds_reward", "seconds_step_values",
                               "seconds_ref_log_probs", "seconds_update")]
      assert min(phases) >= 0 and 0.5 * m["epoch_seconds"] < sum(phases) <= m["epoch_seconds"]
  assert (wd / "checkpoints").is_dir()
  # The finetuned params differ from the base model's (the one the config starts from:
  # PRDP's main job starts from assets/positions), and load back as a bundle.
  base_dir = json.loads((wd / "config.json").read_text())["base_dir"]
  _, base, _ = pretrained.load_shapes_base(base_dir or None)
  _, tuned, meta = pretrained.load_shapes_base(str(wd))
  assert meta["objective"] == r["objective"]
  moved = max(float(np.max(np.abs(a - b)))
              for a, b in zip(jax.tree.leaves(base["unet"]), jax.tree.leaves(tuned["unet"])))
  assert moved > 0
  # The text encoder is frozen (finetune.trainable = ^(unet|dit)/).
  for a, b in zip(jax.tree.leaves(base["text"]), jax.tree.leaves(tuned["text"])):
    np.testing.assert_array_equal(a, b)


def test_resumed_run_continues_the_same_curve(tmp_path):
  """DDPO (with per-prompt reward statistics in the checkpoint): 2 epochs straight ==
  1 epoch, stop, resume to 2, bit for bit. The second run scores the base model's
  log-probs (its KL metric) inside the rollout (config.ref_in_rollout) instead of in a
  separate scan: the same KL to 1e-5."""
  args = ["--config.eval_every=0"]
  run_main("configs/ddpo.py:smoke", tmp_path / "a", *args, env=DEFAULT_XLA)
  args.append("--config.ref_in_rollout=true")
  run_main("configs/ddpo.py:smoke", tmp_path / "b", "--config.epochs=1", *args, env=DEFAULT_XLA)
  run_main("configs/ddpo.py:smoke", tmp_path / "b", *args, env=DEFAULT_XLA)
  _, a, _ = pretrained.load_shapes_base(str(tmp_path / "a"))
  _, b, _ = pretrained.load_shapes_base(str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  kl = [[m["kl_to_ref"] for _, m in sorted(_results(tmp_path / w)["curve"].items())]
        for w in "ab"]
  assert len(kl[0]) == 2 and np.all(np.abs(kl[0]) > 0)
  np.testing.assert_allclose(kl[0], kl[1], rtol=1e-5, atol=1e-7)


def test_lora_finetuning_keeps_base_outside_targets(tmp_path):
  wd = tmp_path / "lora"
  run_main("configs/alignprop.py:smoke,lora", wd, "--config.eval_every=0")
  _, base, _ = pretrained.load_shapes_base()
  _, tuned, _ = pretrained.load_shapes_base(str(wd))
  flat_b = dict(jax.tree_util.tree_flatten_with_path(base)[0])
  changed = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tuned)[0]:
    if not np.array_equal(leaf, flat_b[path]):
      changed.append("/".join(str(k.key) for k in path))
  assert changed, "LoRA training changed nothing"
  assert all(p.endswith("kernel") and ("attn" in p or "conv" in p) for p in changed), changed


def test_ema_params_are_evaluated_and_exported(tmp_path):
  """With ema_decay the EMA is part of the checkpointed state, and the run exports a model."""
  wd = tmp_path / "ema"
  run_main("configs/raft.py:smoke", wd, "--config.ema_decay=0.5", "--config.eval_every=0")
  _, base, _ = pretrained.load_shapes_base()
  _, ema, _ = pretrained.load_shapes_base(str(wd))
  from rft import checkpoint
  ck = checkpoint.Checkpointer(str(wd / "checkpoints"))
  tree = ck.saved_tree()
  assert "ema_params" in tree["state"]  # the EMA is part of the checkpointed state
  moved = max(float(np.max(np.abs(a - b)))
              for a, b in zip(jax.tree.leaves(base["unet"]), jax.tree.leaves(ema["unet"])))
  assert moved > 0


def test_bad_config_values_are_clear_errors(tmp_path):
  p = run_main("configs/prdp.py:smoke", tmp_path / "x", "--config.samples_per_prompt=1",
               check=False)
  assert p.returncode != 0 and "samples_per_prompt" in p.stderr
  p = run_main("configs/draft.py:smoke", tmp_path / "y",
               "--config.reward=jpeg_compressibility", check=False)
  assert p.returncode != 0 and "not differentiable" in p.stderr
  p = run_main("configs/ddpo.py:smoke", tmp_path / "z", "--config.sampler.eta=0.0", check=False)
  assert p.returncode != 0 and "eta" in p.stderr


def test_group_stats():
  m = diffusion_rl.group_stats(np.array([1.0, 1.0, 0.0, 2.0]), 2)
  assert m["reward_mean"] == 1.0
  assert m["zero_std_groups"] == 0.5
  assert m["reward_std_within_prompt"] == pytest.approx(0.5)
