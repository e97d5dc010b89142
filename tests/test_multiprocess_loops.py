"""The real training loops as two jax processes equal one process with the same 8 devices.

`rft.main` runs as two processes on 127.0.0.1 (RFT_COORDINATOR / RFT_NUM_PROCESSES /
RFT_PROCESS_ID; 4 fake CPU devices each, gloo collectives) on a data2 x fsdp2 x tensor2
mesh with FSDP forced on small params (`config.sharding.min_size`): each process builds
its rows of the prompts, the rollout, rewards, per-prompt statistics and advantages see
the global batch, orbax writes one checkpoint from both processes, and only process 0
logs and exports. The same command as one process with 8 devices must give the same
training metrics; a single process resumes the two-process checkpoint and continues the
curve of an uninterrupted single-process run.
"""
import json
import re
import pathlib
import shutil

import numpy as np
import pytest

from rft import checkpoint, tb_events
from tests.helpers import JAX_CACHE, ROOT, run_main, run_processes

ROOT_ASSETS = pathlib.Path(ROOT) / "rft" / "assets"

MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.sharding.min_size=256")
TRAIN_KEYS = ("loss", "grad_norm", "reward_mean")
# lr 1e-4 so params move ~1e-4 per update, well beyond the tolerance. Adam eps 1e-5, not
# 1e-8: an entry whose gradient is rounding noise (different for each reduction order:
# gloo across processes vs. in-process) moves by lr * g / (|g| + eps), a whole lr step at
# eps 1e-8 (tests/test_update_sharding.py measures this for one process).
OPTIMIZER = ("--config.lr=1e-4", "--config.adam_eps=1e-5")


def _two_processes(config, workdir, *overrides):
  logs = run_processes(["-m", "rft.main", f"--config={config}", f"--workdir={workdir}",
                        *MESH, *overrides], env={"JAX_COMPILATION_CACHE_DIR": JAX_CACHE})
  progress = re.compile(r": (step|epoch) 1/\d+ \(")  # the progress line (rft.metrics)
  assert progress.search(logs[0]) and not progress.search(logs[1])  # process 0 logs alone
  return logs


def _train_metrics(workdir, step):
  scalars = tb_events.read_scalars(str(workdir))
  return {k: dict(scalars[f"train/{k}"])[step] for k in TRAIN_KEYS}


def _params(workdir, name):
  flat = {}
  params = checkpoint.load_params_file(str(workdir / f"{name}.msgpack"))
  import jax
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
  return flat


def _assert_close_metrics(a, b, what):
  """Train metrics to 2e-4 relative: the collectives sum in another order across processes
  (gloo) than inside one, rewards differ by ~2e-5 relative, and PRDP's loss squares
  (r(a) - r(b)) / beta with beta 1e-3 (measured up to 4e-5 relative apart). A wrong row
  split or a process working on half the batch moves these by percents."""
  print(what, a, b)
  for k in TRAIN_KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{what}: {k}")


def _assert_close_params(a, b, base, atol):
  assert a.keys() == b.keys()
  moved = max(float(np.max(np.abs(a[k] - base[k]))) for k in a)
  assert moved > 10 * atol, moved  # training moved the params well beyond the tolerance
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f"params moved {moved:.3g}, max difference {diff:.3g}")
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


# Slow (~3 min alone, three 8-device runs): CI keeps the GRPO two-process test below
# (the same distributed machinery: rft.distributed, placement, global statistics) and the
# PRDP update's 8-device equality (test_update_sharding.py).
@pytest.mark.slow
def test_prdp_epoch_two_processes_equal_one_and_resume_in_one(tmp_path):
  cfg = "configs/prdp.py:smoke"
  common = ("--config.eval_every=0", "--config.ckpt_every=1", *OPTIMIZER)
  two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
  _two_processes(cfg, two, "--config.epochs=1", *common)
  assert (two / "checkpoints" / "1" / "state" / "ocdbt.process_1").is_dir()
  run_main(cfg, one, "--config.epochs=2", *common, *MESH, devices=8)
  _assert_close_metrics(_train_metrics(two, 1), _train_metrics(one, 1), "epoch 1")
  # One process resumes the two-process checkpoint (epoch 1) and runs epoch 2.
  shutil.copytree(two, resumed)
  p = run_main(cfg, resumed, "--config.epochs=2", *common, *MESH, devices=8)
  assert "resumed" in p.stderr
  _assert_close_metrics(_train_metrics(resumed, 2), _train_metrics(one, 2), "epoch 2")
  _assert_close_params(_params(resumed, "shapes_base"), _params(one, "shapes_base"),
                       _params(two, "shapes_base"), atol=1e-5)
  assert json.loads((resumed / "results.json").read_text())["epochs"] == 2


def test_grpo_step_two_processes_equal_one(tmp_path):
  cfg = "configs/grpo.py:smoke,kl"  # kl: the frozen reference params are placed too
  common = ("--config.steps=1", "--config.prompts_per_step=8", "--config.warmup=0",
            "--config.eval_every=1", "--config.eval_problems=8", *OPTIMIZER)
  two, one = tmp_path / "two", tmp_path / "one"
  logs = _two_processes(cfg, two, *common)
  assert "step 1  accuracy" in logs[0] and "step 1  accuracy" not in logs[1]  # the eval line
  run_main(cfg, one, *common, *MESH, devices=8)
  _assert_close_metrics(_train_metrics(two, 1), _train_metrics(one, 1), "step 1")
  h2 = json.loads((two / "results.json").read_text())["history"]
  h1 = json.loads((one / "results.json").read_text())["history"]
  assert h2 == h1  # evaluation (greedy and sampled accuracy) on the placed params
  base = _params(ROOT_ASSETS, "arith_base")
  _assert_close_params(_params(two, "arith_base"), _params(one, "arith_base"), base, 2e-6)
