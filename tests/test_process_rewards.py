"""Dense (process) rewards and GRPO's per-token advantages: hand computations, the
config checks, and the LM loop with `configs/grpo.py:process`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft import config as config_lib
from rft.data.arithmetic import CharTokenizer
from rft.objectives import grpo
from rft.rewards import base as rewards_base
from rft.rewards import dense


def test_arith_digit_steps_by_hand():
  ends, r = dense.arith_digit_steps("85", "85")
  assert ends.tolist() == [1, 2, 3] and r.tolist() == [1, 1, 1]
  ends, r = dense.arith_digit_steps("86", "85")
  assert ends.tolist() == [1, 2, 3] and r.tolist() == [1, 0, 0]
  assert dense.arith_digit_steps("9", "85")[1].tolist() == [0, 0]
  assert dense.arith_digit_steps("850", "85")[1].tolist() == [1, 1, 0, 0]
  ends, r = dense.arith_digit_steps("", "85")
  assert ends.tolist() == [1] and r.tolist() == [0]
  reward = rewards_base.build_term("arith_digits")
  np.testing.assert_array_equal(reward(["85", "86"], {"answers": ["85", "85"]}), [1, 0])
  assert [x[1].tolist() for x in reward.steps_fn(["86"], ["85"])] == [[1, 0, 0]]


def test_step_tokens_place_the_last_step_on_the_end_token():
  tok = CharTokenizer()
  ids = tok.encode("86", eos=True) + [tok.pad_id] * 2
  # steps end after "8", after "6", past the text (the EOS token)
  assert dense.step_tokens(tok, np.asarray(ids), 3, [1, 2, 3]).tolist() == [0, 1, 2]
  # a truncated completion (no EOS): past the text is its last token
  ids = tok.encode("866")
  assert dense.step_tokens(tok, np.asarray(ids), 3, [1, 2, 3, 4]).tolist() == [0, 1, 2, 2]


def test_process_advantages_by_hand():
  rewards = [np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]),
             np.array([0.0, 0.0]), np.array([1.0])]
  tokens = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([0, 2]), np.array([1])]
  got = grpo.process_advantages(rewards, tokens, group_size=2, length=4)
  want = np.zeros((4, 4))
  for g in range(2):
    pooled = np.concatenate(rewards[2 * g:2 * g + 2])
    mean, std = pooled.mean(), pooled.std(ddof=1)
    for i in (2 * g, 2 * g + 1):
      norm = (rewards[i] - mean) / (std + 1e-4)
      for t in range(4):
        want[i, t] = sum(n for n, k in zip(norm, tokens[i]) if k >= t)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[1, 3] != 0 and got[0, 3] == 0  # nothing after the last step
  with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
    grpo.process_advantages([np.array([1.0]), np.array([0.0])], [np.array([4]), np.array([0])],
                            2, 4)
  with pytest.raises(ValueError, match="2 step rewards but 1 step tokens"):
    grpo.process_advantages([np.array([1.0, 0.0]), np.array([0.0])],
                            [np.array([0]), np.array([0])], 2, 4)


def test_policy_loss_takes_per_token_advantages():
  rng = np.random.default_rng(0)
  lp = jnp.asarray(rng.normal(size=(3, 5)) - 2, jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], jnp.float32)
  adv = jnp.asarray([0.5, -1.0, 2.0])
  same = grpo.policy_loss(lp, lp, adv, mask)[0]
  np.testing.assert_allclose(grpo.policy_loss(lp, lp, jnp.repeat(adv[:, None], 5, 1), mask)[0],
                             same, rtol=1e-6)
  # At ratio 1 the gradient is REINFORCE with each token's own advantage, grpo aggregation.
  a_tok = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  g = jax.grad(lambda x: grpo.policy_loss(x, jax.lax.stop_gradient(x), a_tok, mask)[0])(lp)
  want = -a_tok * mask / mask.sum(1, keepdims=True) / 3
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"\[N, L\]"):
    grpo.policy_loss(lp, lp, jnp.zeros((3, 4)), mask)


def test_process_rewards_config_errors():
  c = config_lib.load("grpo", "process,smoke")
  grpo._check_grpo(c)  # pylint: disable=protected-access
  with c.unlocked():
    c.objective.loss = "gspo"
  with pytest.raises(ValueError, match="token-level importance"):
    grpo._check_grpo(c)  # pylint: disable=protected-access
  c = config_lib.load("grpo", "process,smoke")
  with c.unlocked():
    c.reward = "arith_digits,exact_match:0.5"
  with pytest.raises(ValueError, match="one dense reward"):
    grpo._check_grpo(c)  # pylint: disable=protected-access
  from rft.train import lm_rl
  c = config_lib.load("grpo", "process,rebel,smoke")
  with pytest.raises(ValueError, match="process_rewards is a GRPO option"):
    lm_rl.validate(c)
  with pytest.raises(ValueError, match="config.reward: process rewards need exactly one"):
    dense.dense_reward(rewards_base.build("exact_match"))


def test_process_smoke_run_trains_on_step_advantages(tmp_path, monkeypatch):
  """configs/grpo.py:process,smoke through the LM loop; prepare sees per-token advantages
  built from each completion's digit steps."""
  from rft.train import lm_rl
  seen = []
  original = grpo.process_advantages

  def spy(step_rewards, step_tokens, group_size, length, eps=1e-4):
    out = original(step_rewards, step_tokens, group_size, length, eps)
    seen.append((list(step_rewards), list(step_tokens), out))
    return out

  monkeypatch.setattr(grpo, "process_advantages", spy)
  results = lm_rl.train_and_evaluate(config_lib.load("grpo", "process,smoke"), str(tmp_path))
  assert results["steps"] == 2 and len(seen) == 2
  rewards, tokens, adv = seen[0]
  assert adv.shape[0] == len(rewards) == 2 * 4
  for r, t in zip(rewards, tokens):
    assert len(r) == len(t) and set(np.unique(r)) <= {0.0, 1.0}
    assert np.all(np.diff(t) >= 0)  # steps in token order
  assert np.isfinite(adv).all() and np.abs(adv).max() > 0
