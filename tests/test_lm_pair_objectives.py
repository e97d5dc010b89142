"""LM pair objectives (REBEL, CoPG) against hand-computed values, their config checks, and
the dapo aggregation's whole-step divisor through minibatches and the lm_rl loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft import config as config_lib
from rft.objectives import copg, lm_pairs, registry, rebel

NAN = float("nan")


def _close(got, want, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64), rtol=0, atol=atol)


# One group of 3 rows (pair group 0) and a lone row (pair group 1, no partner).
# Per-token log-ratios lp − anchor: row 0 (0.1, 0.2), row 1 (−0.2, pad), row 2 (0.05, 0.05),
# row 3 (0.4, 0.4): sequence sums 0.3, −0.2, 0.1, 0.8.
DELTA = np.array([[0.1, 0.2], [-0.2, NAN], [0.05, 0.05], [0.4, 0.4]], np.float32)
MASK = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], np.float32)
REWARDS = np.array([1.0, 0.0, 0.5, 3.0], np.float32)
GROUP = np.array([0, 0, 0, 1], np.int32)
VALID = np.ones(4, bool)
ANCHOR = np.array([[-1.0, -2.0], [-0.5, NAN], [-3.0, -1.0], [-2.0, -2.0]], np.float32)
LP = ANCHOR + np.nan_to_num(DELTA)  # padding of LP is finite; the anchor's is NaN


# ----------------------------------------------------------------------------- pairs


def test_pair_groups_and_mask():
  assert lm_pairs.pair_groups(8, 4, "all").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  assert lm_pairs.pair_groups(8, 4, "consecutive").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  with pytest.raises(ValueError, match="even group_size"):
    lm_pairs.pair_groups(6, 3, "consecutive")
  with pytest.raises(ValueError, match="whole groups"):
    lm_pairs.pair_groups(7, 4, "all")
  with pytest.raises(ValueError, match="pairing 'best'"):
    lm_pairs.pair_groups(8, 4, "best")
  m = np.asarray(lm_pairs.pair_mask(lm_pairs.pair_groups(8, 4, "all"), np.ones(8, bool)))
  assert m.sum() == 2 * 6 and not np.any(np.tril(m))  # C(4, 2) per group, i < j only
  valid = np.ones(8, bool)
  valid[1] = False  # a dropped row is in no pair: 3 + 6 pairs remain
  assert np.asarray(lm_pairs.pair_mask(lm_pairs.pair_groups(8, 4, "all"), valid)).sum() == 9


# ----------------------------------------------------------------------------- REBEL


def _rebel(lp, **kw):
  return rebel.rebel_loss(lp, jnp.asarray(ANCHOR), jnp.asarray(MASK), jnp.asarray(REWARDS),
                          jnp.asarray(GROUP), jnp.asarray(VALID), **kw)


def test_rebel_loss_and_gradient_by_hand():
  # η = 0.5: a = s/η − r = (0.6 − 1, −0.4 − 0, 0.2 − 0.5) = (−0.4, −0.4, −0.3) in group 0.
  # Pairs (0,1): 0, (0,2): (−0.1)², (1,2): (−0.1)² -> loss 0.02 / 3.
  (loss, m), g = jax.value_and_grad(lambda x: _rebel(x, eta=0.5), has_aux=True)(
      jnp.asarray(LP))
  _close(loss, 0.02 / 3)
  # dL/da = (2/3)(Σ over partners of a_i − a_j) = (−0.2/3, −0.2/3, 0.4/3); da/dlp_t = m_t / η.
  _close(g, [[-0.4 / 3, -0.4 / 3], [-0.4 / 3, 0.0], [0.8 / 3, 0.8 / 3], [0.0, 0.0]])
  assert float(m["pairs"]) == 3.0
  _close(m["reward_diff_abs"], (1 + 0.5 + 0.5) / 3)
  _close(m["predicted_diff_abs"], (1.0 + 0.4 + 0.6) / 3)
  # The reference code's form (Δ ln π/π_old − η Δr)² is η² times this loss.
  s = np.nansum(DELTA * MASK, axis=1)
  code = np.mean([((s[i] - s[j]) - 0.5 * (REWARDS[i] - REWARDS[j])) ** 2
                  for i, j in ((0, 1), (0, 2), (1, 2))])
  _close(code, 0.25 * float(loss), atol=1e-7)


def test_rebel_at_theta_old_is_a_pairwise_policy_gradient():
  # lp == old: loss = mean (Δr)², gradient −(2/η) Σ_partners (r_i − r_j) m / pairs.
  (loss, m), g = jax.value_and_grad(lambda x: _rebel(x, eta=2.0), has_aux=True)(
      jnp.asarray(ANCHOR))
  _close(loss, (1 + 0.25 + 0.25) / 3)
  _close(m["ratio_mean"], 1.0)
  want = -(2 / 2.0) * np.array([1 + 0.5, -1 - 0.5, -0.5 + 0.5, 0.0]) / 3
  _close(g, want[:, None] * MASK)  # row 2 (r at the group's centre) gets exactly 0


def test_rebel_zero_loss_and_gradient_cases():
  # Log-ratio differences that already equal η Δr: loss and gradient exactly 0.
  eta = 0.5
  lp = ANCHOR.copy()
  lp[:, 0] = ANCHOR[:, 0] + eta * REWARDS  # s_i = η r_i (row 1's pad stays NaN-free below)
  lp = np.where(MASK > 0, lp, 0.0).astype(np.float32)
  (loss, _), g = jax.value_and_grad(lambda x: _rebel(x, eta=eta), has_aux=True)(jnp.asarray(lp))
  assert float(loss) == 0.0 and not np.any(np.asarray(g))
  # Equal rewards within each group at θ = θ_old: exactly 0 as well.
  flat = rebel.rebel_loss(jnp.asarray(ANCHOR), jnp.asarray(ANCHOR), jnp.asarray(MASK),
                          jnp.ones(4), jnp.asarray(GROUP), jnp.asarray(VALID), eta=1.0)[0]
  assert float(flat) == 0.0
  # A dropped row (valid False) gets no gradient and leaves the others' pairs.
  valid = np.array([True, True, False, True])
  g = jax.grad(lambda x: rebel.rebel_loss(
      x, jnp.asarray(ANCHOR), jnp.asarray(MASK), jnp.asarray(REWARDS), jnp.asarray(GROUP),
      jnp.asarray(valid), eta=1.0)[0])(jnp.asarray(LP))
  assert not np.any(np.asarray(g)[2:]) and np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="eta > 0"):
    _rebel(jnp.asarray(LP), eta=0.0)


def test_rebel_kl_to_reference_shifts_the_reward():
  # β = 0.1, ref = old − (1, 2, 3, 0) on each masked token: ln π_old/π_ref sums (2, 1, 6, 0)
  # -> rewards (1 − 0.2, 0 − 0.1, 0.5 − 0.6) = (0.8, −0.1, −0.1) at θ = θ_old.
  ref = ANCHOR - np.array([1.0, 1.0, 3.0, 0.0], np.float32)[:, None]
  loss, m = _rebel(jnp.asarray(ANCHOR), eta=1.0, ref_log_probs=jnp.asarray(ref), beta=0.1)
  _close(loss, (0.9 ** 2 + 0.9 ** 2 + 0.0) / 3)
  _close(m["kl_sequence"], (2 + 1 + 6 + 0) / 4)
  with pytest.raises(ValueError, match="ref_log_probs"):
    _rebel(jnp.asarray(ANCHOR), eta=1.0, beta=0.1)


# ----------------------------------------------------------------------------- CoPG


def _copg(lp, beta=0.5, **kw):
  return copg.copg_loss(lp, jnp.asarray(ANCHOR), jnp.asarray(MASK), jnp.asarray(REWARDS),
                        jnp.asarray(GROUP), jnp.asarray(VALID), beta=beta, **kw)


def test_copg_loss_and_gradient_by_hand():
  # β = 0.5, u = ln π/π_ref = (0.3, −0.2, 0.1): a = βu − r = (−0.85, −0.1, −0.45).
  # Pairs: (0,1) −0.75, (0,2) −0.4, (1,2) 0.35 -> loss (0.5625 + 0.16 + 0.1225) / 3.
  (loss, m), g = jax.value_and_grad(lambda x: _copg(x, old_log_probs=jnp.asarray(LP)),
                                    has_aux=True)(jnp.asarray(LP))
  _close(loss, 0.845 / 3)
  # dL/da = (2/3)(−0.75 − 0.4, 0.75 + 0.35, 0.4 − 0.35); times β per masked token.
  da = np.array([-1.15, 1.1, 0.05, 0.0]) * 2 / 3
  _close(g, (0.5 * da)[:, None] * MASK)
  _close(m["ratio_mean"], 1.0)
  _close(m["log_ratio_ref_sequence"], (0.3 - 0.2 + 0.1 + 0.8) / 4)


def test_copg_gradient_is_the_contrastive_policy_gradient():
  """∇ℓ = −2β g with g the policy gradient that baselines each completion by its
  partner's regularised reward: the stop-gradient surrogate −sg[ΔR_β] Δ ln π."""
  beta = 0.3
  rng = np.random.default_rng(0)
  lp = jnp.asarray(ANCHOR + np.where(MASK > 0, rng.normal(size=MASK.shape), 0.0), jnp.float32)
  pairs = ((0, 1), (0, 2), (1, 2))

  def surrogate(x):
    m = jnp.asarray(MASK)
    seq_lp = jnp.sum(jnp.where(m > 0, x * m, 0.0), axis=1)
    u = lm_pairs.sequence_sum(x - jnp.asarray(ANCHOR), m)
    r_beta = jax.lax.stop_gradient(jnp.asarray(REWARDS) - beta * u)
    return -sum((r_beta[i] - r_beta[j]) * (seq_lp[i] - seq_lp[j]) for i, j in pairs) / 3

  g_sq = jax.grad(lambda x: _copg(x, beta=beta)[0])(lp)
  g_pg = jax.grad(surrogate)(lp)
  _close(g_sq, 2 * beta * np.asarray(g_pg), atol=1e-5)
  assert np.abs(np.asarray(g_pg)).max() > 0.1  # not a vacuous 0 == 0


def test_copg_zero_cases_and_errors():
  # β Δu = Δr for every pair: π ∝ π_ref exp(r/β) on the samples; loss and gradient 0.
  beta = 0.25
  lp = np.where(MASK > 0, ANCHOR, 0.0).astype(np.float32)
  lp[:, 0] += REWARDS / beta
  (loss, _), g = jax.value_and_grad(lambda x: _copg(x, beta=beta), has_aux=True)(
      jnp.asarray(lp))
  assert float(loss) == 0.0 and not np.any(np.asarray(g))
  with pytest.raises(ValueError, match="beta > 0"):
    _copg(jnp.asarray(LP), beta=0.0)


# ----------------------------------------------------------------------------- records


def _config(variant):
  return config_lib.load("grpo", f"smoke,{variant}")


def test_records_prepare_and_loss_read_the_batch():
  config = _config("rebel")
  config.objective.pairs = "consecutive"
  obj = registry.lm("rebel")
  kw = obj.settings(config.objective)
  assert kw == {"eta": 1.0, "beta": 0.0, "pairs": "consecutive"} and not obj.uses_reference(kw)
  rollout = {"rewards": np.array([1, 0, 0, 0, 1, 1, 0, 1], np.float32),
             "truncated": np.zeros(8, bool)}
  entries, _ = obj.prepare(config, kw, rollout, 4, None)
  assert entries["pair_group"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  assert entries["loss_weight"].tolist() == [1.0] * 8
  config.objective.overlong_filter = True
  rollout["truncated"][3] = True
  entries, _ = obj.prepare(config, kw, rollout, 4, None)
  assert entries["loss_weight"][3] == 0.0
  zeros = np.zeros((8, 2), np.float32)
  batch = dict(entries, old_log_probs=zeros)
  mask = np.ones((8, 2), np.float32) * entries["loss_weight"][:, None]
  loss, m = obj.loss(kw, jnp.asarray(zeros), jnp.asarray(mask), batch)
  # Pairs (0,1) Δr = 1, (4,5) 0, (6,7) −1; (2,3) dropped with row 3 -> (1 + 0 + 1) / 3.
  _close(loss, 2 / 3)
  assert float(m["pairs"]) == 3.0
  c = _config("copg")
  cobj = registry.lm("copg")
  ckw = cobj.settings(c.objective)
  assert ckw == {"beta": 0.1, "pairs": "all"} and cobj.uses_reference(ckw)
  assert cobj.label(c) == "all_pairs"


@pytest.mark.parametrize("variant,key,value,match", [
    ("rebel", "objective.eta", 0.0, "config.objective.eta=0.0"),
    ("rebel", "objective.pairs", "best", "config.objective.pairs='best'"),
    ("rebel", "group_size", 1, "config.group_size=1"),
    ("copg", "group_size", 3, "config.group_size=3 must be even"),
    ("copg", "objective.beta", 0.0, "config.objective.beta=0.0"),
    ("rebel", "objective.dynamic_sampling", True, "config.objective.dynamic_sampling=True"),
    ("copg", "objective.clip_eps", 0.2, "config.objective.clip_eps=0.2"),
    ("rebel", "objective.loss", "dapo", "config.objective.loss='dapo'"),
    ("copg", "reward_aggregation", "normalize_then_sum", "config.reward_aggregation="),
])
def test_bad_pair_objective_settings_name_the_key(variant, key, value, match):
  from rft.train import lm_rl
  config = _config(variant)
  if variant == "copg" and key == "group_size":
    config.objective.pairs = "consecutive"
  node, _, leaf = key.rpartition(".")
  setattr(config[node] if node else config, leaf, value)
  with pytest.raises(ValueError, match=match.replace("(", r"\(")):
    lm_rl.validate(config)


def test_config_variants():
  assert _config("rebel").objective.name == "rebel"
  c = _config("copg")
  assert (c.objective.name, c.objective.beta) == ("copg", 0.1)
  with pytest.raises(ValueError, match="objective.beta"):
    config_lib.load("grpo", "smoke,rebel,kl")
  with pytest.raises(ValueError, match="keep one"):
    config_lib.load("grpo", "rebel,copg")


# ----------------------------------------------------------------------------- dapo


def _dapo_batch():
  """4 groups of 2 rows, completion lengths 1..4 so minibatch token counts differ."""
  rng = np.random.default_rng(1)
  n, length = 8, 4
  lengths = np.array([1, 2, 4, 4, 3, 1, 2, 2])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
  old = rng.normal(size=(n, length)).astype(np.float32) - 2
  lp = old + rng.normal(scale=0.1, size=(n, length)).astype(np.float32)
  batch = {"old_log_probs": old, "advantages": rng.normal(size=n).astype(np.float32),
           "completion": np.zeros((n, length), np.int32), "loss_weight": np.ones(n, np.float32)}
  return lp, mask, batch


def _rows(batch, idx):
  return {k: v[idx] for k, v in batch.items()}


@pytest.mark.parametrize("minibatch_groups", [[[0, 1], [2, 3]], [[0], [1], [2], [3]]])
def test_dapo_minibatch_gradients_add_up_to_the_whole_batch(minibatch_groups):
  obj = registry.lm("grpo")
  config = config_lib.load("grpo", "smoke")
  lp, mask, batch = _dapo_batch()
  total = float(mask.sum())

  def grads(loss_name, with_step_count):
    config.objective.loss = loss_name
    kw = obj.settings(config.objective)
    g = np.zeros_like(lp)
    for groups in minibatch_groups:
      idx = np.concatenate([[2 * k, 2 * k + 1] for k in groups])
      mb = _rows(batch, idx)
      if with_step_count:
        mb["step_loss_tokens"] = np.full(len(idx), total, np.float32)
      g[idx] += np.asarray(jax.grad(lambda x: obj.loss(kw, x, jnp.asarray(mask[idx]), mb)[0])(
          jnp.asarray(lp[idx])))
    return g

  config.objective.loss = "dapo"
  kw = obj.settings(config.objective)
  whole = np.asarray(jax.grad(lambda x: obj.loss(kw, x, jnp.asarray(mask), batch)[0])(
      jnp.asarray(lp)))
  _close(grads("dapo", True), whole, atol=1e-7)
  # Without the whole step's count dapo falls back to each minibatch's own (= bnpo), and
  # the token counts differ between minibatches, so the sum is not the whole-batch gradient.
  bnpo = grads("bnpo", False)
  _close(bnpo, grads("dapo", False), atol=1e-7)
  assert np.abs(bnpo - whole).max() > 1e-3


def test_minibatch_plan_counts_every_minibatch_of_the_pass():
  from rft.train import lm_rl
  config = config_lib.load("grpo", "smoke")
  config.group_size, config.minibatches = 2, 2
  row_tokens = np.array([1, 2, 4, 4, 3, 1, 2, 2], np.float32)
  rows, total = lm_rl.minibatch_plan(config, 0, 0, 4, row_tokens)
  assert len(rows) == 2 and sorted(np.concatenate(rows).tolist()) == list(range(8))
  assert total == row_tokens.sum()
  host = {"completion_mask": np.ones((3, 4), np.float32), "loss_weight": np.array([1, 0, 0.5])}
  _close(lm_rl.loss_tokens(host), [4, 0, 2])


def test_the_loop_passes_the_whole_step_token_count(tmp_path):
  """A probe objective wrapping the dapo loss reports, per update, its minibatch's loss
  tokens and the batch's step_loss_tokens: with 2 minibatches of one group each, the
  step count is their sum."""
  import jax.numpy as jnp
  from rft import tb_events
  from rft.train import lm_rl
  base = registry.lm("grpo")

  def loss(kw, log_probs, mask, batch):
    value, m = base.loss(kw, log_probs, mask, batch)
    return value, dict(m, probe_step_tokens=batch["step_loss_tokens"][0],
                       probe_minibatch_tokens=jnp.sum(mask))

  registry.register_lm(registry.LMObjective(
      name="probe_dapo", summary="dapo with token-count metrics", settings=base.settings,
      prepare=base.prepare, loss=loss, label=lambda config: "dapo"))
  try:
    config = config_lib.load("grpo", "smoke")
    config.objective.name, config.objective.loss = "probe_dapo", "dapo"
    config.minibatches, config.steps, config.eval_every = 2, 1, 0
    lm_rl.train_and_evaluate(config, str(tmp_path))
  finally:
    registry.unregister("probe_dapo", lm_table=True)
  s = tb_events.read_scalars(str(tmp_path))
  (_, step_tokens), = s["train/probe_step_tokens"]
  (_, mb_tokens), = s["train/probe_minibatch_tokens"]  # mean of the 2 minibatches
  assert step_tokens > 0 and step_tokens == pytest.approx(2 * mb_tokens)
