"""Tests for rft.checkpoint: orbax Checkpointer, params files, tree checks."""

import os
import subprocess
import sys
import textwrap

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rft import checkpoint as ck
from tests.helpers import xla_flags


def _params(width=4, seed=0):
  # numpy-made values: eager jax.random ops compile slowly on a busy CPU.
  r = np.random.RandomState(seed)
  return {
      "unet": {
          "conv_in": {
              "kernel": jnp.asarray(r.randn(3, 3, 3, width), jnp.float32),
              "bias": jnp.asarray(r.randn(width), jnp.float32)},
          "out": {"kernel": jnp.asarray(r.randn(width, 2), jnp.float32)},
      }
  }


def _state(width=4, seed=0, step=0):
  params = _params(width, seed)
  (adam, *rest) = optax.adam(1e-3).init(params)
  # Non-trivial adam moments and count.
  r = np.random.RandomState(seed + 1)
  moments = lambda: jax.tree_util.tree_map(
      lambda p: jnp.asarray(r.rand(*p.shape), jnp.float32), params)
  adam = adam._replace(count=jnp.asarray(seed + 3, jnp.int32), mu=moments(),
                       nu=moments())
  return {
      "params": params,
      "opt_state": (adam, *rest),
      "step": step,
      "rng": jnp.asarray([seed, seed + 100], jnp.uint32),  # a raw PRNG key
  }


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if isinstance(x, (int, float)):
      assert type(x) is type(y) and x == y
    else:
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x, y)


def test_save_restore_bitwise_fresh_checkpointer(tmp_path):
  d = str(tmp_path / "ckpt")
  state = _state(step=5)
  c = ck.Checkpointer(d, max_to_keep=3)
  assert c.latest_step() is None
  assert c.save(5, state, {"epoch": 2, "note": "x"})
  c.close()

  c2 = ck.Checkpointer(d)
  assert c2.latest_step() == 5
  template = _state(seed=1, step=0)  # same structure, different values
  restored, meta = c2.restore(template)
  assert meta == {"epoch": 2, "note": "x"}
  _assert_trees_equal(restored, state)
  assert restored["rng"].dtype == jnp.uint32
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  # Abstract template also works.
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
      if isinstance(x, jax.Array) else x, template)
  restored2, _ = c2.restore(abstract, step=5)
  _assert_trees_equal(restored2, state)
  c2.close()


def test_max_to_keep_and_latest(tmp_path):
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d, max_to_keep=2)
  for s in (1, 2, 3, 4):
    c.save(s, _state(seed=s, step=s))
  assert c.latest_step() == 4
  assert c.all_steps() == [3, 4]
  assert sorted(int(x) for x in os.listdir(d) if x.isdigit()) == [3, 4]
  restored, _ = c.restore(_state(), step=3)
  _assert_trees_equal(restored, _state(seed=3, step=3))
  with pytest.raises(FileNotFoundError, match="step 1"):
    c.restore(_state(), step=1)
  c.close()


def test_save_interval(tmp_path):
  c = ck.Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=10)
  assert c.save(0, _state())
  assert not c.save(5, _state())
  assert c.save(7, _state(), force=True)
  assert c.all_steps() == [0, 7]
  c.close()


def test_nan_state_refused(tmp_path):
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d)
  c.save(1, _state())
  bad = _state()
  bad["params"]["unet"]["out"]["kernel"] = (
      bad["params"]["unet"]["out"]["kernel"].at[0, 0].set(jnp.nan))
  with pytest.raises(ck.NonFiniteError, match="params/unet/out/kernel"):
    c.save(2, bad)
  assert c.latest_step() == 1
  assert not os.path.exists(os.path.join(d, "2"))
  c.close()


def test_shape_mismatch_named(tmp_path):
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d)
  c.save(1, _state(width=32))
  with pytest.raises(ck.CheckpointMismatchError) as e:
    c.restore(_state(width=64))
  msg = str(e.value)
  assert "params/unet/conv_in/kernel" in msg
  assert "(3, 3, 3, 32)" in msg and "(3, 3, 3, 64)" in msg
  assert "checkpoint (3, 3, 3, 32) vs model (3, 3, 3, 64)" in msg
  assert d in msg
  c.close()


def test_missing_and_unexpected_keys_named(tmp_path):
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d)
  c.save(1, _state())
  template = _state()
  template["params"]["unet"]["extra"] = {"kernel": jnp.zeros((2,))}
  del template["params"]["unet"]["out"]
  with pytest.raises(ck.CheckpointMismatchError) as e:
    c.restore(template)
  msg = str(e.value)
  assert "missing key 'params/unet/extra/kernel'" in msg
  assert "unexpected key 'params/unet/out/kernel'" in msg
  c.close()


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  ema: list
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


def _train_state(seed, tx=_TX):
  params = _params(seed=seed)
  return TrainState(step=jnp.asarray(seed, jnp.int32), params=params,
                    opt_state=tx.init(params),
                    rng=jax.random.key(seed),  # typed key
                    ema=[jnp.full((3,), float(seed)), np.arange(2) + seed],
                    tx=tx)


def test_dataclass_train_state(tmp_path):
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d)
  state = _train_state(3)
  c.save(10, state, {"k": 1})
  restored, meta = ck.Checkpointer(d).restore(_train_state(0))
  assert meta == {"k": 1}
  assert isinstance(restored, TrainState)
  assert restored.tx is not None
  assert int(restored.step) == 3
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(state.rng))
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert isinstance(restored.ema[1], np.ndarray)
  _assert_trees_equal(jax.tree_util.tree_map(
      lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x, restored),
                      jax.tree_util.tree_map(
      lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x, state))
  c.close()


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_restore_in_new_process_onto_shardings(tmp_path):
  """A fresh process (4 fake CPU devices) restores onto the template's
  shardings, from concrete and from abstract templates."""
  d = str(tmp_path / "ckpt")
  c = ck.Checkpointer(d)
  c.save(3, _state(seed=7, step=3), {"from": "parent"})
  c.close()
  expected = _state(seed=7, step=3)
  out = tmp_path / "restored.npz"
  code = textwrap.dedent(f"""
      import sys, numpy as np, jax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      sys.path.insert(0, {_REPO!r})
      from tests.test_checkpoint import _state
      from rft.checkpoint import Checkpointer
      assert jax.device_count() == 4
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = NamedSharding(mesh, P(None, None, None, "data"))
      template = _state(seed=0, step=0)
      conv = template["params"]["unet"]["conv_in"]
      conv["kernel"] = jax.device_put(conv["kernel"], sharded)
      state, meta = Checkpointer({d!r}).restore(template)
      assert meta == {{"from": "parent"}}, meta
      k = state["params"]["unet"]["conv_in"]["kernel"]
      assert k.sharding == sharded, k.sharding
      assert len(k.addressable_shards) == 4
      assert k.addressable_shards[0].data.shape == (3, 3, 3, 1)
      abstract = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
          if isinstance(x, jax.Array) else x, template)
      state2, _ = Checkpointer({d!r}).restore(abstract)
      assert state2["params"]["unet"]["conv_in"]["kernel"].sharding == sharded
      leaves = jax.tree_util.tree_leaves(state)
      leaves2 = jax.tree_util.tree_leaves(state2)
      np.savez({str(out)!r}, *[np.asarray(x) for x in leaves + leaves2])
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(4)}
  subprocess.run([sys.executable, "-c", code], check=True, timeout=180,
                 env=env, cwd=_REPO)
  got = np.load(out)
  leaves = jax.tree_util.tree_leaves(expected)
  assert len(got.files) == 2 * len(leaves)
  for i, leaf in enumerate(leaves + leaves):
    np.testing.assert_array_equal(got[f"arr_{i}"], np.asarray(leaf))


def test_restore_without_checkpoint(tmp_path):
  c = ck.Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    c.restore(_state())
  c.close()


def test_ensure_workdir(tmp_path):
  good = tmp_path / "a" / "b" / "c"
  assert ck.ensure_workdir(good) == str(good)
  assert os.path.isdir(good) and os.listdir(good) == []
  blocker = tmp_path / "file.txt"
  blocker.write_text("not a dir")
  bad = str(blocker / "workdir")
  with pytest.raises(ck.WorkdirError) as e:
    ck.ensure_workdir(bad)
  assert bad in str(e.value)
  assert isinstance(e.value, OSError)
  with pytest.raises(ck.WorkdirError, match="not a directory"):
    ck.ensure_workdir(str(blocker))
  # The Checkpointer checks its directory up front too.
  with pytest.raises(ck.WorkdirError):
    ck.Checkpointer(bad)


def test_tree_mismatches_and_finite():
  a = {"p": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
       "step": 1}
  b = {"p": {"w": np.zeros((2, 4), np.float32), "c": np.zeros(3, np.float32)},
       "step": np.int32(4)}
  assert sorted(ck.tree_mismatches(a, b)) == sorted([
      "missing key 'p/b'",
      "unexpected key 'p/c'",
      "shape mismatch at 'p/w': checkpoint (2, 4) vs model (2, 3)",
  ])
  assert ck.tree_mismatches(a, a) == []
  c = {"p": {"w": np.zeros((2, 3), np.int32), "b": np.zeros(3, np.float32)},
       "step": 1}
  assert ck.tree_mismatches(a, c) == [
      "dtype mismatch at 'p/w': checkpoint int32 vs model float32"]
  with pytest.raises(ck.CheckpointMismatchError, match="some/file"):
    ck.check_tree_matches(a, b, "some/file")

  ck.assert_finite({"x": jnp.ones(3), "i": jnp.arange(3), "n": 1.0})
  with pytest.raises(ck.NonFiniteError) as e:
    ck.assert_finite({"x": jnp.ones(3), "y": [np.array([1.0, np.inf])],
                      "z": {"q": jnp.array([jnp.nan])}}, what="state")
  assert "'y/0'" in str(e.value) and "'z/q'" in str(e.value)
  assert "'x'" not in str(e.value)


def test_params_file_roundtrip(tmp_path):
  path = str(tmp_path / "assets" / "params.msgpack")
  params = _params(width=8)
  ck.save_params_file(path, params)
  raw = ck.load_params_file(path)
  assert isinstance(raw, dict)
  loaded = ck.load_params_file(path, template=_params(width=8, seed=5))
  _assert_trees_equal(loaded, jax.device_get(params))

  with pytest.raises(ck.CheckpointMismatchError) as e:
    ck.load_params_file(path, template=_params(width=4))
  assert path in str(e.value)
  assert "unet/conv_in/kernel" in str(e.value)
  assert "(3, 3, 3, 8) vs model (3, 3, 3, 4)" in str(e.value)

  missing = str(tmp_path / "nope.msgpack")
  with pytest.raises(FileNotFoundError, match="nope.msgpack"):
    ck.load_params_file(missing)

  bad = _params()
  bad["unet"]["out"]["kernel"] = bad["unet"]["out"]["kernel"] * jnp.inf
  bad_path = str(tmp_path / "bad.msgpack")
  with pytest.raises(ck.NonFiniteError, match="unet/out/kernel"):
    ck.save_params_file(bad_path, bad)
  assert not os.path.exists(bad_path)


def test_params_file_flax_module(tmp_path):
  import flax.linen as nn
  model = nn.Dense(3)
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
  path = str(tmp_path / "dense.msgpack")
  ck.save_params_file(path, variables)
  loaded = ck.load_params_file(path, template=model.init(
      jax.random.PRNGKey(1), jnp.ones((1, 2))))
  x = jnp.ones((1, 2))
  np.testing.assert_array_equal(model.apply(loaded, x),
                                model.apply(variables, x))
