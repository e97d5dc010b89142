"""rft.placement: the mesh and rules from the config, batches, host copies, and update jits
whose state layout is fixed (explicit in / out shardings, donated, compiled once)."""
import textwrap

import pytest
from ml_collections import config_dict

from rft import placement as PL
from tests.helpers import run_python


def _cfg(**kw):
  return config_dict.ConfigDict(kw)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.mesh names axes \['model'\]"):
    PL.Placement.from_config(_cfg(mesh={"model": 1}))
  with pytest.raises(ValueError, match="config.mesh: mesh axes .* need 2 devices, have 1"):
    PL.Placement.from_config(_cfg(mesh={"data": 2}))
  with pytest.raises(ValueError, match=r"config.sharding.frozen='zero3' is not a rule set"):
    PL.Placement.from_config(_cfg(sharding={"frozen": "zero3"}))
  with pytest.raises(ValueError, match=r"config.sharding has unknown keys \['params'\]"):
    PL.Placement.from_config(_cfg(sharding={"params": "lm"}))
  p = PL.Placement.from_config(_cfg(sharding={"trained": "lm", "min_size": 7}))
  assert p.trained.rules == PL.RULE_SETS["lm"].rules and p.trained.min_size == 7
  assert p.reward.default == "replicate" and p.frozen.default == "fsdp"
  assert p.data_parallel == 1


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ml_collections import config_dict
    from rft import config as config_lib, pretrained, sharding as S
    from rft.placement import Placement
    from rft.train import lm_rl
    from rft.train.state import TrainState, make_optimizer
    assert jax.device_count() == 8
    pl = Placement.from_config(config_dict.ConfigDict(
        {"mesh": {"data": 2, "fsdp": 2, "tensor": 2},
         "sharding": {"trained": "lm", "frozen": "lm", "min_size": 1024}}))
    assert pl.data_parallel == 4
    try:
      pl.check_rows(6, "config.prompts_per_step * config.group_size")
      raise SystemExit("6 rows accepted on 4 data-parallel devices")
    except ValueError as e:
      assert "config.prompts_per_step * config.group_size=6 rows is not divisible by the 4" in str(e), e

    # Batches: per-row leaves split over (data, fsdp), others replicated; gather / take_rows.
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    b = pl.batch({"x": x, "shared": np.arange(5)}, size=8)
    assert b["x"].sharding.spec[0] == ("data", "fsdp"), b["x"].sharding
    assert {s.data.shape for s in b["x"].addressable_shards} == {(2, 3)}
    assert b["shared"].sharding.spec == P()
    np.testing.assert_array_equal(pl.gather(b)["x"], x)
    np.testing.assert_array_equal(pl.local_rows(b["x"]), x)  # one process holds every row
    idx = np.array([7, 0, 3, 3, 5, 1, 2, 6])
    t = pl.take_rows({"x": b["x"]}, idx)["x"]
    np.testing.assert_array_equal(np.asarray(t), x[idx])
    assert t.sharding.spec[0] == ("data", "fsdp")
    r = pl.take_rows({"x": b["x"]}, idx[:6], strict=False)["x"]  # 6 rows: replicated
    np.testing.assert_array_equal(np.asarray(r), x[idx[:6]])
    assert r.sharding.spec == P()
    assert pl.batch(x[:6], strict=False).sharding.spec == P()

    # State created sharded by the rules; the update keeps that layout and compiles once.
    cfg, base, _ = pretrained.load_arith_base()
    config = config_lib.load("grpo", "smoke")
    tx = make_optimizer(1e-3, 10, schedule="constant")
    state = pl.create_state(lambda p: TrainState.create(p, tx), base)
    want = pl.state_shardings(state)
    same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: x.sharding == y, a, b))
    assert same(state, want)
    q = state.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor"), q.sharding.spec
    mu = state.opt_state[0][0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")  # Adam's moments follow their param
    update = lm_rl.make_update(cfg, config, tx, pl, state)
    rng = np.random.default_rng(0)
    N, Lp, Lc = 8, 7, 6
    mb = pl.batch({"prompt": rng.integers(1, cfg.vocab_size, (N, Lp)).astype(np.int32),
                   "prompt_mask": np.ones((N, Lp), bool),
                   "completion": rng.integers(1, cfg.vocab_size, (N, Lc)).astype(np.int32),
                   "completion_mask": np.ones((N, Lc), np.float32),
                   "loss_weight": np.ones(N, np.float32),
                   "old_log_probs": np.full((N, Lc), -3.0, np.float32),
                   "advantages": rng.normal(size=N).astype(np.float32)})
    before = jax.device_get(state.params)
    for _ in range(3):
      state, m = update(state, mb)
      assert same(state, want)
    assert update._cache_size() == 1, update._cache_size()
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)))
    assert moved > 1e-4, moved
    print("OK")
""")


def test_batches_state_and_update_layout_on_8_devices():
  p = run_python(["-c", SCRIPT], devices=8, timeout=300)
  assert "OK" in p.stdout
