"""The arithmetic world: tokenizer, problems, split, padding."""
import numpy as np
import pytest

from rft.data.arithmetic import ArithmeticWorld, CharTokenizer, left_pad


def test_tokenizer_round_trip_and_specials():
  tok = CharTokenizer()
  ids = tok.encode("12+7=", bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert ids[1:-1] == [3 + 1, 3 + 2, 3 + 10, 3 + 7, 3 + 13]
  assert tok.decode(ids) == "12+7="
  assert tok.decode([tok.pad_id, *tok.encode("85"), tok.eos_id, *tok.encode("9")]) == "85"
  assert tok.vocab_size == 3 + 15


def test_tokenizer_unknown_character_names_it():
  with pytest.raises(ValueError, match=r"'x' at position 2 of '12x3='"):
    CharTokenizer().encode("12x3=")


def test_world_problems_answers_and_split():
  w = ArithmeticWorld(max_operand=9, ops="+-*", holdout_fraction=0.25, split_seed=3)
  assert len(w.problems) == 100 * 3
  i = w.prompts.index("7*8=")
  assert w.answers[i] == "56"
  assert w.answers[w.prompts.index("3-9=")] == "-6"
  tr, ho = set(w.split_ids["train"]), set(w.split_ids["heldout"])
  assert not tr & ho and len(tr | ho) == 300
  assert 0.15 < len(ho) / 300 < 0.35
  # Every digit and operator appears in training prompts.
  assert set("".join(w.prompts[j] for j in tr)) == set("0123456789+-*=")
  # eval_ids: fixed and within the split.
  a, b = w.eval_ids("heldout", 20), w.eval_ids("heldout", 20)
  np.testing.assert_array_equal(a, b)
  assert set(a) <= ho
  with pytest.raises(ValueError, match="split='test'"):
    w.eval_ids("test", 3)


def test_prompt_and_answer_tokens_padding():
  w = ArithmeticWorld(max_operand=99, ops="+")
  ids = [w.prompts.index("5+3="), w.prompts.index("57+63=")]
  pt, pm = w.prompt_tokens(ids)
  assert pt.shape == (2, w.max_prompt_len) == (2, 7)
  assert pm[0].tolist() == [False, False, True, True, True, True, True]
  assert w.tokenizer.decode(pt[1][pm[1]]) == "57+63="
  at, am = w.answer_tokens(ids)
  assert w.tokenizer.decode(at[0]) == "8" and am[0].tolist() == [True, True, False, False, False]
  assert at[1].tolist()[:4] == w.tokenizer.encode("120", eos=True)
  with pytest.raises(ValueError, match="sequence 0 has 3 tokens"):
    left_pad([[1, 2, 3]], 2, 0)


def test_unknown_operator():
  with pytest.raises(ValueError, match=r"unknown operator\(s\) \['/'\]"):
    ArithmeticWorld(ops="+/")


def test_noisy_corpus_answers_are_near_misses_that_fit():
  from rft.train.pretrain_lm import noisy_answers
  w = ArithmeticWorld()
  answers = [w.answers[i] for i in range(0, len(w.answers), 7)]
  rng = np.random.default_rng(0)
  noisy = noisy_answers(answers, 1.0, rng)
  diffs = np.array([int(n) - int(a) for n, a in zip(noisy, answers)])
  assert np.all((np.abs(diffs) >= 1) & (np.abs(diffs) <= 10))
  assert 0.4 < np.mean(diffs > 0) < 0.6
  w.answer_tokens_for(noisy)  # every near miss fits the answer length (no error)
  some = noisy_answers(answers, 0.3, np.random.default_rng(1))
  frac = np.mean([s != a for s, a in zip(some, answers)])
  assert 0.25 < frac < 0.35
  assert noisy_answers(answers, 0.0, rng) == answers
