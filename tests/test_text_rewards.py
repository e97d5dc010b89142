"""LM rewards (rft.rewards.text): answer extraction and normalisation, exact match, format."""
import re

import numpy as np
import pytest

from rft.rewards import base, text


@pytest.mark.parametrize("completion,want", [
    ("so x = \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("first \\boxed{42}, then \\boxed{43}", "43"),
    ("\\boxed{2^{10}} done", "2^{10}"),
    ("<think>2+2</think><answer> 4 </answer>", " 4 "),
    ("3 + 4 = 7\n#### 1,234\n", "1,234"),
    ("Reasoning...\nAnswer: +5.\nThanks", "+5."),
    ("I think it is 3, no wait, 7", "7"),
    ("half of it: -1/2", "-1/2"),
    ("no idea", None),
])
def test_extract_answer(completion, want):
  assert text.extract_answer(completion) == want


@pytest.mark.parametrize("answer,target,want", [
    ("3/4", "0.75", True),
    ("\\frac{3}{4}", "0.75", True),
    ("\\dfrac{6}{8}", "3/4", True),
    ("-1/2", "-0.5", True),
    ("2.50", "2.5", True),
    ("1,000,000", "1000000", True),
    ("+5.", "5", True),
    (" 12 ", "12", True),
    ("$\\$5$", "5", True),
    ("x + 1", "x+1", True),
    ("1,2", "12", False),
    ("5", "6", False),
    ("0.75", "3/5", False),
    ("7 apples", "7", False),
    (None, "7", False),
])
def test_answers_equal(answer, target, want):
  assert text.answers_equal(answer, target) is want


def test_math_answer_reward():
  completions = [
      "We get \\boxed{\\frac{1}{2}}",  # fraction vs decimal
      "Total cost: 1,250 dollars.\n#### 1,250",  # GSM8K style, commas
      "The answer is 12.",  # last number
      "\\boxed{5}",  # wrong
      "I cannot solve this.",  # nothing to extract
      "<think>hmm</think>\n<answer>-3</answer>",
  ]
  targets = ["0.5", "1250", "12", "6", "1", "-3"]
  r = text.math_answer_reward()
  assert r.host and not r.differentiable
  got = r(completions, targets)
  assert got.dtype == np.float32 and got.shape == (6,)
  assert got.tolist() == [1, 1, 1, 0, 0, 1]
  np.testing.assert_array_equal(r(completions, {"answers": targets}), got)
  with pytest.raises(ValueError, match="answers"):
    r(completions, {"targets": targets})
  with pytest.raises(ValueError, match="6 completions but 2 targets"):
    r(completions, targets[:2])


def test_exact_match():
  r = text.exact_match_reward()
  got = r(["42", " 42\nmore text", "42 ", "4 2", "42.0", "\n42"], ["42"] * 6)
  assert got.tolist() == [1, 1, 1, 0, 0, 1]


def test_format_reward():
  r = text.format_reward()
  got = r(["<think>a\nb</think>\n<answer>5</answer>",
           "  <think></think><answer>x</answer>\n",
           "<answer>5</answer>",
           "<think>a</think> <answer>5</answer> trailing",
           "<think>a</think> no answer"], None)
  assert got.tolist() == [1, 1, 0, 0, 0]
  boxed = text.format_reward(r"\\boxed\{.+\}", full=False)
  assert boxed(["so \\boxed{3} ok", "3"], None).tolist() == [1, 0]
  with pytest.raises(re.error):
    text.format_reward("(unclosed")


def test_registered_and_combined():
  from rft.rewards import ensure_registered
  ensure_registered()
  for name in ("math_answer", "exact_match", "format"):
    assert name in base.REGISTRY
  r = base.build("math_answer:1,format:0.5")
  assert r.host and not r.differentiable
  completions = ["<think>t</think><answer>4</answer>", "\\boxed{4}", "<think></think><answer>5</answer>"]
  got = r(completions, ["4", "4", "4"])
  np.testing.assert_allclose(got, [1.5, 1.0, 0.5])
  assert {k: v.tolist() for k, v in r.parts(completions, ["4"] * 3).items()} == {
      "math_answer": [1, 1, 0], "format": [1, 0, 1]}
