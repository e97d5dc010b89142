"""Rewards from an LM's probabilities (CRew confidence, judge P(yes)) and best-of-N
reranking: values against hand computations on the shipped arithmetic LM."""
import json

import numpy as np
import pytest

from rft import pretrained
from rft.data.arithmetic import ArithmeticWorld, CharTokenizer
from rft.models import lm
from rft.rewards import base, lm_judge, rerank
from rft.tools import best_of_n as bon_tool


@pytest.fixture(scope="module")
def arith():
  cfg, params, meta = pretrained.load_arith_base()
  return cfg, params, ArithmeticWorld(**meta["world"])


def _log_softmax_rows(cfg, params, ids):
  """Log-softmax of the next token after each prefix of one unpadded sequence (numpy)."""
  tok = np.asarray([ids], np.int32)
  logits, _ = lm.forward(cfg, params, tok, np.arange(len(ids))[None], np.ones_like(tok, bool))
  x = np.asarray(logits[0], np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      x.max(-1, keepdims=True)


def test_confidence_is_the_mean_probability_of_the_answer_tokens(arith):
  cfg, params, world = arith
  tok = CharTokenizer()
  reward = base.build_term("lm_confidence")
  prompts, completions = ["47+38=", "9*7=", "12-30="], ["85", "62", "-18"]
  got = reward(completions, {"prompts": prompts, "answers": ["85", "63", "-18"]})
  for p, c, g in zip(prompts, completions, got):
    ids = tok.encode(p + c, bos=True)
    lp = _log_softmax_rows(cfg, params, ids)
    n_prompt = len(tok.encode(p, bos=True))
    probs = [np.exp(lp[i - 1, ids[i]]) for i in range(n_prompt, len(ids))]
    np.testing.assert_allclose(g, np.mean(probs), rtol=1e-5)
  geo = base.build_term("lm_confidence", {"statistic": "geo"})(
      completions[:1], {"prompts": prompts[:1]})
  ids = tok.encode(prompts[0] + completions[0], bos=True)
  lp = _log_softmax_rows(cfg, params, ids)
  n_prompt = len(tok.encode(prompts[0], bos=True))
  np.testing.assert_allclose(geo[0], np.exp(np.mean(
      [lp[i - 1, ids[i]] for i in range(n_prompt, len(ids))])), rtol=1e-5)


def test_only_the_final_answer_counts_and_no_answer_scores_zero(arith):
  cfg, params, _ = arith
  tok = CharTokenizer()
  reward = base.build_term("lm_confidence")
  # "3+4 = 7": the final answer is the last number, "7": one token.
  got = reward(["3+4 = 7", ""], {"prompts": ["3+4=", "3+4="]})
  ids = tok.encode("3+4=" + "3+4 = 7", bos=True)
  lp = _log_softmax_rows(cfg, params, ids)
  np.testing.assert_allclose(got[0], np.exp(lp[-2, ids[-1]]), rtol=1e-5)
  assert got[1] == 0.0
  # Multi-character tokens: the tokens overlapping the boxed answer's characters.
  completion = "x=\\boxed{12}"
  mask = lm_judge.answer_token_mask(completion, [0, 1, 2, 3], [2, 9, 10, 12])
  assert mask.tolist() == [False, False, True, True]


def test_confidence_separates_right_from_near_miss_answers(arith):
  """The base LM's confidence ranks its correct answers above answers off by 1 or 10
  (measured AUROC 0.92 on 256 held-out problems): a shifted or misread position would
  drop it to chance."""
  _, _, world = arith
  ids = world.eval_ids("heldout", 64, 0)
  prompts, answers = [world.prompts[i] for i in ids], [world.answers[i] for i in ids]
  rng = np.random.default_rng(0)
  wrong = [str(int(a) + int(rng.choice([-10, -1, 1, 10]))) for a in answers]
  reward = base.build_term("lm_confidence")
  s = reward(answers + wrong, {"prompts": prompts + prompts})
  auc = bon_tool.auc(s, [1] * 64 + [0] * 64)
  assert auc > 0.8, auc


def test_judge_probability_of_yes_by_hand(arith):
  cfg, params, _ = arith
  tok = CharTokenizer()
  raw = base.build_term("lm_judge", {"template": "{prompt}{completion}", "yes": "1",
                                     "normalize": False})
  norm = base.build_term("lm_judge", {"template": "{prompt}{completion}", "yes": "1",
                                      "no": "0"})
  targets = {"prompts": ["5+5=", "99*9="]}
  r, n = raw(["1", "89"], targets), norm(["1", "89"], targets)
  for k, text in enumerate(["5+5=1", "99*9=89"]):
    lp = _log_softmax_rows(cfg, params, tok.encode(text, bos=True))[-1]
    p1, p0 = np.exp(lp[tok.encode("1")[0]]), np.exp(lp[tok.encode("0")[0]])
    np.testing.assert_allclose(r[k], p1, rtol=1e-5)
    np.testing.assert_allclose(n[k], p1 / (p1 + p0), rtol=1e-5)
  no_prompt = base.build_term("lm_judge", {"template": "{completion}=", "yes": "2",
                                           "normalize": False})
  assert no_prompt(["1+1"], ["ignored"]).shape == (1,)  # no prompts needed


def test_judge_and_confidence_errors_name_the_option():
  with pytest.raises(ValueError, match="lm_judge.yes=.* 2 tokens"):
    base.build_term("lm_judge", {"yes": "12", "no": "0"})
  with pytest.raises(ValueError, match=r"lm_judge.template=.*\{completion\}"):
    base.build_term("lm_judge", {"template": "{prompt}", "yes": "1", "no": "0"})
  with pytest.raises(ValueError, match="only the fields"):
    base.build_term("lm_judge", {"template": "{completion}{other}", "yes": "1", "no": "0"})
  with pytest.raises(ValueError, match="lm_judge.normalize=True needs"):
    base.build_term("lm_judge", {"yes": "1"})
  with pytest.raises(ValueError, match="lm_confidence.statistic"):
    base.build_term("lm_confidence", {"statistic": "median"})
  with pytest.raises(FileNotFoundError, match="neither an arithmetic LM bundle"):
    base.build_term("lm_confidence", {"path": "/nonexistent/folder"})
  reward = base.build_term("lm_confidence")
  with pytest.raises(ValueError, match="needs each completion's prompt"):
    reward(["85"], ["85"])


def test_best_of_n_majority_vote_and_table_by_hand():
  scores = [0.1, 0.9, 0.9, 0.2, 0.3, 0.3]  # groups of 3; the second group ties
  np.testing.assert_array_equal(rerank.best_of_n(scores, 3), [1, 4])
  np.testing.assert_array_equal(rerank.majority_vote(["1", "2", "2", "7", "7", "8"], 3), [1, 3])
  correct = [0, 1, 0, 1, 0, 0]
  t = rerank.rerank_table(scores, correct, 3, answers=["1", "2", "2", "7", "7", "8"])
  assert t == {"one_sample": 0.5, "mean_sample": 2 / 6, "best_of_n": 0.5, "oracle": 1.0,
               "majority_vote": 1.0}
  with pytest.raises(ValueError, match="groups of N=4"):
    rerank.best_of_n(scores, 4)
  with pytest.raises(ValueError, match="NaN"):
    rerank.best_of_n([0.0, float("nan")], 2)
  assert bon_tool.auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_best_of_n_tool_runs_and_orders_its_numbers(tmp_path):
  out = tmp_path / "bon.json"
  bon_tool.main(["--reward", "lm_confidence", "--n", "4", "--problems", "16", "--seeds", "2",
                 "--json", str(out)])
  rec = json.loads(out.read_text())
  for r in rec["per_seed"]:
    assert r["oracle"] >= max(r["best_of_n"], r["majority_vote"], r["one_sample"])
    assert 0.0 <= r["mean_sample"] <= r["oracle"]
  assert rec["summary"]["best_of_n"]["n"] == 2


def test_best_of_n_curve_by_hand():
  scores = [[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]]
  gold = [[1, 0, 1, 1], [0, 1, 1, 0]]
  c = rerank.best_of_n_curve(scores, gold, [1, 2, 4])
  assert c[1] == {"reward": np.mean(scores), "gold": 0.625}
  # n=2 groups: (0.1, 0.9) -> 0.9 [0], (0.5, 0.7) -> 0.7 [1], (0.3, 0.2) -> 0.3 [0],
  # (0.8, 0.1) -> 0.8 [1]
  assert c[2] == {"reward": pytest.approx((0.9 + 0.7 + 0.3 + 0.8) / 4), "gold": 0.5}
  assert c[4] == {"reward": pytest.approx(0.85), "gold": 0.5}
  with pytest.raises(ValueError, match="n=3 does not divide"):
    rerank.best_of_n_curve(scores, gold, [3])


def test_best_of_n_tool_on_shapes_world(tmp_path):
  out = tmp_path / "bon.json"
  bon_tool.main(["--world", "shapes", "--n", "2", "--problems", "2", "--seeds", "1",
                 "--json", str(out)])
  rec = json.loads(out.read_text())
  (seed,) = rec["per_seed"]
  assert set(seed["curve"]) == {"1", "2"} and rec["args"]["reward"] == "shapes_alignment"
  assert seed["curve"]["2"]["reward"] >= seed["curve"]["1"]["reward"]  # the pick's reward
  assert seed["oracle"] >= seed["curve"]["2"]["gold"]


def test_confidence_and_judge_on_a_hf_folder_match_transformers(tmp_path):
  """A tiny random Qwen2 saved by transformers: CRew's mean answer-token probability and
  the judge's P(yes) against transformers' own softmax."""
  import torch
  from tests.test_lm_tasks import _tiny_qwen
  model = _tiny_qwen(tmp_path / "m")
  path = str(tmp_path / "m")
  prompt, completion = "What is 12 + 7?", " The answer is \\boxed{19}."
  crew = base.build_term("lm_confidence", {"path": path})
  got = crew([completion], {"prompts": [prompt]})[0]
  scorer = lm_judge.load_scoring_lm(path)
  p_ids, c_ids = scorer.ids(prompt, bos=True), scorer.ids(completion)
  with torch.no_grad():
    logits = model(torch.tensor([p_ids + c_ids])).logits[0].double()
  probs = torch.softmax(logits, -1).numpy()
  a0 = completion.rindex("19")
  starts = [0] + scorer.char_ends(c_ids)[:-1]
  ends = scorer.char_ends(c_ids)
  answer = [i for i in range(len(c_ids)) if starts[i] < a0 + 2 and ends[i] > a0]
  assert answer  # the boxed answer's tokens
  want = np.mean([probs[len(p_ids) + i - 1, c_ids[i]] for i in answer])
  np.testing.assert_allclose(got, want, rtol=2e-4)
  judge = base.build_term("lm_judge", {"path": path, "template": "{prompt}{completion} ",
                                       "yes": "1", "no": "0", "normalize": True})
  text_ids = scorer.ids(prompt + completion + " ", bos=True)
  with torch.no_grad():
    last = torch.softmax(model(torch.tensor([text_ids])).logits[0, -1].double(), -1).numpy()
  y, n = scorer.ids("1")[0], scorer.ids("0")[0]  # one byte-level token each
  np.testing.assert_allclose(judge([completion], {"prompts": [prompt]})[0],
                             last[y] / (last[y] + last[n]), rtol=2e-4)
