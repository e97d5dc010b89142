"""rft.distributed: environment detection, and a real two-process run on this machine.

Two processes (4 fake CPU devices each, gloo collectives over 127.0.0.1) join through
RFT_COORDINATOR / RFT_NUM_PROCESSES / RFT_PROCESS_ID, build one 8-device mesh, assemble
a global batch from per-process slices, run AdamW steps of a linear model data-parallel
and write an orbax checkpoint (each process its shards). One process with 8 fake devices
runs the same computation and restores that checkpoint; the test compares the files.

Run a role by hand: python -m tests.test_distributed dist|single OUTDIR
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, clean_env, run_processes, xla_flags

GLOBAL_BATCH = 16
STEPS = 3


# ----------------------------------------------------------------------------
# What the processes run
# ----------------------------------------------------------------------------


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)
  y = (x @ np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], np.float32)
       + rng.normal(scale=0.1, size=(GLOBAL_BATCH, 2)).astype(np.float32))
  return x, y


def _train(mesh, batch):
  """STEPS AdamW steps of a linear model on a `data`-sharded batch; returns the state,
  per-step losses, the batch mean and the (sharded) predictions."""
  import jax
  import jax.numpy as jnp
  import optax
  from rft import placement

  params = placement.replicate({"w": np.full((3, 2), 0.1, np.float32),
                               "b": np.zeros((2,), np.float32)}, mesh)
  opt = optax.adamw(0.1, weight_decay=0.01)
  opt_state = jax.jit(opt.init, out_shardings=placement.replicated(mesh))(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(batch["x"], axis=0)

  losses = []
  for _ in range(STEPS):
    params, opt_state, loss, mean = step(params, opt_state, batch)
    losses.append(loss)
  preds = jax.jit(lambda p, x: x @ p["w"] + p["b"])(params, batch["x"])
  return {"params": params, "opt_state": opt_state, "x": batch["x"]}, losses, mean, preds


def _flat(tree) -> dict:
  import jax
  from jax.experimental import multihost_utils
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    out[key] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return out


def _worker(role: str, outdir: str) -> None:
  from rft import distributed
  info = distributed.initialize("auto")  # RFT_* variables for "dist"; none for "single"
  import jax
  from jax.sharding import PartitionSpec as P
  from rft import checkpoint, placement

  mesh = placement.make_mesh()
  assert len(mesh.devices.flat) == 8, mesh
  x, y = _data()
  rows = distributed.process_rows(GLOBAL_BATCH, mesh, P("data"))
  batch = distributed.global_batch({"x": x[rows], "y": y[rows]}, mesh, P("data"))
  assert batch["x"].shape == (GLOBAL_BATCH, 3) and len(batch["x"].addressable_shards) == 4 * (
      2 if role == "single" else 1)
  state, losses, mean, preds = _train(mesh, batch)
  results = {"losses": np.stack([np.asarray(l.addressable_data(0)) for l in losses]),
             "mean": np.asarray(mean.addressable_data(0)), "preds": _flat(preds)[""],
             **{f"state/{k}": v for k, v in _flat(state).items()}}
  results["info"] = np.array([info.initialized, info.process_index, info.process_count,
                              jax.process_count(), distributed.is_main_process()])
  ckpt_dir = os.path.join(outdir, "ckpt")
  if role == "dist":
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      ckpt.save(STEPS, state, {"processes": jax.process_count()})
  else:  # restore the two-process checkpoint onto this process's 8-device shardings
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      restored, meta = ckpt.restore(jax.tree.map(jax.numpy.zeros_like, state))
    assert meta == {"processes": 2}, meta
    assert restored["x"].sharding == state["x"].sharding
    results.update({f"restored/{k}": v for k, v in _flat(restored).items()})
  np.savez(os.path.join(outdir, f"{role}_{info.process_index}.npz"), **results)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_two_processes_match_one_process_and_share_a_checkpoint(tmp_path):
  t0 = time.time()
  run_processes(["-m", "tests.test_distributed", "dist", str(tmp_path)], timeout=240)
  t_dist = time.time() - t0
  single = subprocess.run([sys.executable, "-m", "tests.test_distributed", "single",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=clean_env(XLA_FLAGS=xla_flags(8)))
  assert single.returncode == 0, single.stderr[-4000:]
  print(f"two processes {t_dist:.1f}s, single process {time.time() - t0 - t_dist:.1f}s")

  d0, d1 = (dict(np.load(tmp_path / f"dist_{i}.npz")) for i in range(2))
  s = dict(np.load(tmp_path / "single_0.npz"))
  np.testing.assert_array_equal(d0["info"], [1, 0, 2, 2, 1])
  np.testing.assert_array_equal(d1["info"], [1, 1, 2, 2, 0])
  np.testing.assert_array_equal(s["info"], [0, 0, 1, 1, 1])
  state_keys = sorted(k for k in s if k.startswith("state/"))
  assert "state/params/w" in state_keys and "state/opt_state/0/mu/w" in state_keys
  assert sorted(k for k in d0 if k.startswith("state/")) == state_keys
  for key in ["losses", "mean", "preds", *state_keys]:
    np.testing.assert_array_equal(d0[key], d1[key], err_msg=key)  # both processes agree
    np.testing.assert_allclose(d0[key], s[key], rtol=1e-6, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(s["state/x"], _data()[0])
  assert s["losses"][-1] < s["losses"][0]  # the steps did train
  state_dir = tmp_path / "ckpt" / str(STEPS) / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
  for key in state_keys:  # the checkpoint the two processes wrote, restored by one
    np.testing.assert_array_equal(s["restored/" + key[len("state/"):]], d0[key], err_msg=key)


def _slurm_env(**kw):
  env = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "2",
         "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[007-008]",
         "SLURM_JOB_NODELIST": "gpu[007-008]"}
  env.update(kw)
  return {k: v for k, v in env.items() if v is not None}


def test_detect_reads_rft_slurm_and_tpu_variables():
  from rft import distributed
  assert distributed.detect({}) is None
  plan = distributed.detect({"RFT_COORDINATOR": "10.0.0.1:1234", "RFT_NUM_PROCESSES": "4",
                             "RFT_PROCESS_ID": "3", "RFT_LOCAL_DEVICE_IDS": "0,1",
                             **_slurm_env()})  # RFT_* wins over SLURM
  assert (plan.source, plan.coordinator, plan.num_processes, plan.process_id,
          plan.local_device_ids) == ("env", "10.0.0.1:1234", 4, 3, (0, 1))
  plan = distributed.detect(_slurm_env())  # one task per node: all GPUs, no local ids
  assert (plan.source, plan.coordinator, plan.num_processes, plan.process_id,
          plan.local_device_ids) == ("slurm", f"gpu007:{61440 + 12345 % 4096}", 2, 1, None)
  plan = distributed.detect(_slurm_env(SLURM_STEP_NUM_TASKS="16", SLURM_PROCID="9",
                                       SLURM_LOCALID="1", RFT_COORDINATOR_PORT="7777",
                                       SLURM_STEP_NODELIST=None,
                                       SLURM_JOB_NODELIST="a-1,b-2"))  # one task per GPU
  assert (plan.coordinator, plan.num_processes, plan.process_id, plan.local_device_ids) == (
      "a-1:7777", 16, 9, (1,))
  plan = distributed.detect(_slurm_env(SLURM_STEP_NUM_TASKS="16", SLURM_LOCALID="1",
                                       CUDA_VISIBLE_DEVICES="5"))  # SLURM bound one GPU
  assert plan.local_device_ids is None
  assert distributed.detect(_slurm_env(SLURM_STEP_ID=None)) is None  # batch script, no srun
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "t-0"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}).source == "tpu"
  assert distributed.detect({"MEGASCALE_NUM_SLICES": "2"}).detect


@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu[003-007,9],cpu1", "gpu003"),
    ("n[10,2-3]-ib,x", "n10-ib"), ("a-b-1", "a-b-1")])
def test_first_host_of_slurm_nodelist(nodelist, host):
  from rft import distributed
  assert distributed.first_host(nodelist) == host


@pytest.mark.parametrize("env,match", [
    ({"RFT_COORDINATOR": "h:1", "RFT_PROCESS_ID": "0"}, "RFT_NUM_PROCESSES not"),
    ({"RFT_COORDINATOR": "h", "RFT_NUM_PROCESSES": "2", "RFT_PROCESS_ID": "0"},
     "RFT_COORDINATOR='h' is not host:port"),
    ({"RFT_COORDINATOR": "h:1", "RFT_NUM_PROCESSES": "2", "RFT_PROCESS_ID": "2"},
     "RFT_PROCESS_ID=2 must be < RFT_NUM_PROCESSES=2"),
    ({"RFT_COORDINATOR": "h:1", "RFT_NUM_PROCESSES": "two", "RFT_PROCESS_ID": "0"},
     "RFT_NUM_PROCESSES='two' is not an integer"),
    (_slurm_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None),
     "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
    (_slurm_env(SLURM_PROCID="2"), "SLURM_PROCID=2 must be < SLURM_STEP_NUM_TASKS=2"),
])
def test_inconsistent_environment_names_the_variable(env, match):
  from rft import distributed
  with pytest.raises(ValueError, match=match):
    distributed.initialize("auto", environ=env)


def test_initialize_single_process_and_argument_errors():
  from rft import distributed
  assert distributed.initialize("off", environ=_slurm_env()) == distributed.DistributedInfo(
      False, "off", 0, 1)
  assert distributed.initialize("auto", environ={}) == distributed.DistributedInfo(
      False, "single", 0, 1)
  assert distributed.initialize("auto", environ=_slurm_env(SLURM_STEP_NUM_TASKS="1",
                                                           SLURM_PROCID="0")).source == "slurm"
  with pytest.raises(ValueError, match="expected one of auto, on, off"):
    distributed.initialize("yes", environ={})
  with pytest.raises(ValueError, match="process_id not given"):
    distributed.initialize("on", coordinator="h:1", num_processes=2, environ={})
  with pytest.raises(ValueError, match=r"process_id=3 must be in \[0, num_processes=2\)"):
    distributed.initialize("on", coordinator="h:1", num_processes=2, process_id=3, environ={})


def test_global_batch_in_one_process_is_the_whole_batch():
  import jax
  from rft import distributed, placement
  mesh = placement.make_mesh()
  n = len(jax.devices())
  x = np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3)
  assert distributed.process_rows(4 * n, mesh) == slice(0, 4 * n)
  assert distributed.local_batch_size(4 * n) == 4 * n
  out = distributed.global_batch({"x": x}, mesh)
  assert out["x"].sharding == placement.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  assert distributed.is_main_process()
  with pytest.raises(ValueError, match="leading batch dimension"):
    distributed.global_batch(np.float32(1.0), mesh)


def test_main_distributed_on_without_a_cluster_names_the_variables(tmp_path):
  """rft.main --distributed=on initialises before anything else; with no cluster it stops
  with an error naming what to set (and writes nothing)."""
  env = clean_env(XLA_FLAGS=xla_flags(4))
  env = {k: v for k, v in env.items() if not k.startswith(("KUBERNETES_", "OMPI_", "PMI_"))}
  p = subprocess.run([sys.executable, "-m", "rft.main", "--config=configs/pretrain_shapes.py:smoke",
                      f"--workdir={tmp_path / 'w'}", "--distributed=on"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode != 0
  assert "--distributed=on but no multi-process environment was found" in p.stderr, p.stderr
  assert "RFT_COORDINATOR, RFT_NUM_PROCESSES, RFT_PROCESS_ID" in p.stderr
  assert not (tmp_path / "w").exists()


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
