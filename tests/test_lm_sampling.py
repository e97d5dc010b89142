"""KV-cached sampler: greedy = argmax of the full forward, log-probs = the trainer's,
EOS / stop sequences / truncation, top-k / top-p filtering, sampling distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rft.lm import sampling
from rft.models import lm
from rft.train import lm_rl

CFG = lm.LMConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def params():
  d = jnp.zeros((1, 4), jnp.int32)
  p = lm.DecoderLM(CFG).init(jax.random.key(0), d, d, jnp.ones((1, 4), bool))["params"]
  # Larger logits than the default init so sampling is far from uniform.
  return jax.tree.map(lambda x: x * 3.0, p)


def prompts():
  toks = np.array([[0, 0, 1, 5, 6], [1, 7, 8, 9, 3], [0, 0, 0, 1, 4]], np.int32)
  return jnp.asarray(toks), jnp.asarray(toks != 0)


def full_logits(params, pt, pm, completion):
  tokens = jnp.concatenate([pt, completion], axis=1)
  mask = jnp.concatenate([pm, jnp.ones(completion.shape, bool)], axis=1)
  logits, _ = lm.forward(CFG, params, tokens, sampling.positions_from_mask(mask), mask)
  return logits


def test_greedy_equals_argmax_of_full_forward(params):
  pt, pm = prompts()
  sc = sampling.SamplingConfig(max_new_tokens=6, greedy=True)
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(0), sampling=sc, eos_id=99,
                          pad_id=PAD)
  assert out.tokens.shape == (3, 6) and np.all(np.asarray(out.mask) == 1)
  logits = full_logits(params, pt, pm, out.tokens)
  want = np.asarray(jnp.argmax(logits[:, pt.shape[1] - 1:-1], axis=-1))
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert not np.any(np.asarray(out.truncated) == False)  # noqa: E712  (no EOS: all truncated)


def test_sampler_log_probs_match_trainer(params):
  pt, pm = prompts()
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=0.7)
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(1), sampling=sc, eos_id=EOS,
                          pad_id=PAD)
  lp = sampling.token_log_probs(CFG, params, pt, pm, out.tokens, out.mask, temperature=0.7)
  m = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(lp) * m, np.asarray(out.log_probs) * m, atol=2e-5)
  assert np.all(np.asarray(out.log_probs) * m <= 0)


def test_policy_log_probs_ratio_exactly_one_inside_grad(params):
  """Stored old log-probs (no-grad jit) == log-probs inside a jitted value_and_grad."""
  pt, pm = prompts()
  sc = sampling.SamplingConfig(max_new_tokens=8)
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(2), sampling=sc, eos_id=EOS,
                          pad_id=PAD)
  batch = {"prompt": pt, "prompt_mask": pm, "completion": out.tokens,
           "completion_mask": out.mask}
  old, _ = jax.jit(lambda p, b: lm_rl.policy_log_probs(CFG, 1.0, p, b))(params, batch)

  @jax.jit
  def ratio_and_grad(p, b, old):
    def f(p):
      lp, _ = lm_rl.policy_log_probs(CFG, 1.0, p, b)
      ratio = jnp.exp(lp - old)
      return jnp.sum(ratio * b["completion_mask"]), ratio
    return jax.value_and_grad(f, has_aux=True)(p)

  (_, ratio), grads = ratio_and_grad(params, batch, old)
  m = np.asarray(out.mask) > 0
  assert np.all(np.asarray(ratio)[m] == 1.0)
  # The island's gradient is the plain function's gradient.
  def plain(p):
    lp, _ = lm_rl._log_probs_and_entropy(CFG, 1.0, p, batch)
    return jnp.sum(jnp.exp(lp - old) * batch["completion_mask"])
  want = jax.grad(plain)(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_eos_and_stop_sequences_end_rows(params):
  pt, pm = prompts()
  sc = sampling.SamplingConfig(max_new_tokens=6, greedy=True)
  ref = sampling.generate(CFG, params, pt, pm, jax.random.key(0), sampling=sc, eos_id=99,
                          pad_id=PAD)
  toks = np.asarray(ref.tokens)
  # Use row 0's third greedy token as "EOS": row 0 must stop there (inclusive).
  eos = int(toks[0, 2])
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(0), sampling=sc, eos_id=eos,
                          pad_id=PAD)
  o, m = np.asarray(out.tokens), np.asarray(out.mask)
  for r in range(3):
    hits = np.flatnonzero(toks[r] == eos)
    end = hits[0] + 1 if len(hits) else 6
    np.testing.assert_array_equal(o[r, :end], toks[r, :end])
    assert m[r].tolist() == [1.0] * end + [0.0] * (6 - end)
    assert np.all(o[r, end:] == PAD) and int(out.lengths[r]) == end
    assert bool(out.truncated[r]) == (not len(hits))
  # A two-token stop sequence: row 1's tokens 1..2.
  stop = (int(toks[1, 1]), int(toks[1, 2]))
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(0), sampling=sc, eos_id=99,
                          pad_id=PAD, stop_sequences=(stop,))
  for r in range(3):
    ends = [i + 2 for i in range(5) if (toks[r, i], toks[r, i + 1]) == stop]
    end = ends[0] if ends else 6
    assert int(out.lengths[r]) == end, (r, toks[r], stop)
    np.testing.assert_array_equal(np.asarray(out.tokens)[r, :end], toks[r, :end])
  assert int(out.lengths[1]) <= 3


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  k2 = np.asarray(sampling.filter_logits(logits, 2, 1.0))
  assert np.all(k2[0, :2] > -1e29) and np.all(k2[0, 2:] < -1e29)
  # top_p=0.6: 0.5 alone is < 0.6, so keep 0.5 and 0.2 (mass before 0.2 is 0.5 < 0.6).
  p = np.asarray(sampling.filter_logits(logits[:, ::-1], 0, 0.6))[:, ::-1]
  assert np.all(p[0, :2] > -1e29) and np.all(p[0, 2:] < -1e29)
  p = np.asarray(sampling.filter_logits(logits, 0, 0.71))  # 0.5 + 0.2 = 0.7 < 0.71: 3 kept
  assert np.sum(p > -1e29) == 3


def test_sampling_distribution_matches_softmax(params):
  """First-token frequencies over 4,000 rows vs softmax(logits / T)."""
  n, T = 4000, 1.3
  pt = jnp.tile(jnp.array([[1, 5, 6]], jnp.int32), (n, 1))
  pm = jnp.ones_like(pt, bool)
  sc = sampling.SamplingConfig(max_new_tokens=1, temperature=T)
  out = sampling.generate(CFG, params, pt, pm, jax.random.key(3), sampling=sc, eos_id=99,
                          pad_id=PAD)
  logits, _ = lm.forward(CFG, params, pt[:1], sampling.positions_from_mask(pm[:1]), pm[:1])
  p = np.asarray(jax.nn.softmax(logits[0, -1] / T))
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=16) / n
  assert np.max(np.abs(freq - p)) < 4 * np.sqrt(p.max() * (1 - p.max()) / n) + 1e-3
  np.testing.assert_allclose(np.asarray(out.log_probs[:, 0]),
                             np.log(p)[np.asarray(out.tokens[:, 0])], atol=1e-5)


def test_stop_sequences_from_strings_with_the_char_tokenizer():
  from rft.data.arithmetic import CharTokenizer
  tok = CharTokenizer()
  assert sampling.stop_sequences_from_strings(tok, ["==", "", "7"]) == (
      tuple(tok.encode("==")), tuple(tok.encode("7")))
