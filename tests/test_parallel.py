"""Meshes: the sharded pretrain step equals the one-device step (8 fake CPU devices)."""
import textwrap

import jax
import pytest

from rft import placement
from tests.helpers import run_python

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from rft import placement
    from rft.data import shapes
    from rft.diffusion.pipeline import shapes_pipeline
    from rft.diffusion.schedules import make_schedule
    from rft.train import pretrain
    from rft.train.state import TrainState, make_optimizer
    from rft import config as config_lib
    config = config_lib.load("pretrain_shapes", "smoke")
    assert jax.device_count() == 8
    tok = shapes.tokenizer()
    world = shapes.ShapesWorld()
    model = pretrain.build_model(config.model, tok.vocab_size)
    pipe = shapes_pipeline(model, make_schedule("cosine"))
    tx = make_optimizer(1e-2, 10, 1, grad_clip=1.0)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1, 12), jnp.int32))["params"]
    params = jax.device_get(params)  # host copy: each mesh gets fresh (donatable) buffers
    rng = np.random.default_rng(0)
    ids = world.sample_prompt_ids(rng, 16)
    cells = world.sample_scenes(rng, ids)
    batch = {"cells": cells, "offsets": shapes.sample_offsets(rng, cells),
             "tokens": tok.encode([world.texts[i] for i in ids])}
    step = pretrain.make_train_step(pipe, tx, config)
    results = []
    for mesh in (placement.make_mesh({"data": 1}, jax.devices()[:1]), placement.make_mesh()):
      state = placement.replicate(TrainState.create(params, tx, ema=True), mesh)
      b = placement.shard_batch(batch, mesh)
      with placement.use_mesh(mesh):
        fn = jax.jit(step, in_shardings=(placement.replicated(mesh), placement.batch_sharding(mesh),
                                          placement.replicated(mesh)), donate_argnums=(0,))
        for i in range(2):
          state, m = fn(state, b, jax.random.key(i))
      assert len(b["cells"].sharding.device_set) == mesh.size
      results.append((jax.device_get(state.params), float(m["loss"])))
    (p1, l1), (p8, l8) = results
    print("LOSS", l1, l8)
    assert abs(l1 - l8) < 1e-5 * max(1, abs(l1)), (l1, l8)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print("MAXDIFF", diff)
    assert diff < 1e-5, diff
    try:
      placement.shard_batch({"x": np.zeros((12, 2))}, placement.make_mesh())
      raise SystemExit("indivisible batch accepted")
    except ValueError as e:
      assert "not divisible by the 8 devices" in str(e), e
    print("OK")
""")


# Slow (8-device compile of the pretraining step): the same placement code runs under
# meshes in CI on the RL updates (test_update_sharding.py) and an SD UNet step
# (test_sharding.py).
@pytest.mark.slow
def test_sharded_train_step_equals_single_device():
  p = run_python(["-c", SCRIPT], devices=8)
  assert "OK" in p.stdout, p.stdout + p.stderr[-2000:]


def test_make_mesh_sizes_and_errors():
  m = placement.make_mesh({"data": -1})
  assert m.shape["data"] == jax.device_count()
  with pytest.raises(ValueError, match="at most one size may be -1"):
    placement.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="need 3 devices"):
    placement.make_mesh({"data": 3}, jax.devices()[:1])


def test_shard_batch_places_on_mesh():
  import numpy as np
  m = placement.make_mesh({"data": 1}, jax.devices()[:1])
  out = placement.shard_batch({"x": np.arange(6.0).reshape(3, 2)}, m)
  np.testing.assert_array_equal(out["x"], np.arange(6.0).reshape(3, 2))
  assert out["x"].sharding == placement.batch_sharding(m)
