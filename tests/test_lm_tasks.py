"""Prompt files and HF tokenizers (rft.data.lm_tasks), and the LM online loop on a tiny
random Qwen2 saved with transformers (config hf_math)."""
import json

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from rft import config as config_lib  # noqa: E402
from rft.data import lm_tasks  # noqa: E402
from rft.data.lm_tasks import HFTokenizer, PromptFileTask  # noqa: E402
from rft.worlds import arith_eval  # noqa: E402
from rft.weights import hf_lm  # noqa: E402
from tests.helpers import run_main  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["What is 12 + 7? The answer is \\boxed{19}.", "system user assistant",
          "Please reason step by step, and put your final answer within \\boxed{}.",
          "0123456789 +-*/=?!.,:;()[]{}<>#$ abcdefghijklmnopqrstuvwxyz"]


def tiny_tokenizer(chat_template=True, pad=False):
  """Byte-level BPE (lossless round trip) with Qwen-style specials; eos <|im_end|>."""
  models, pre, dec, trainers = (tokenizers.models, tokenizers.pre_tokenizers,
                                tokenizers.decoders, tokenizers.trainers)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
  tok.decoder = dec.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>",
      **({"pad_token": "<|endoftext|>"} if pad else {}))
  if chat_template:
    fast.chat_template = CHAT_TEMPLATE
  return fast


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


PROBLEMS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16),
                         (17, 18), (19, 20)]]


# --------------------------------------------------------------------------- HFTokenizer


def test_hf_tokenizer_interface():
  t = HFTokenizer(tiny_tokenizer(), extra_eos_ids=[0, 0, 2])
  im_end, endoftext = t.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert t.eos_id == im_end and t.pad_id == im_end  # no pad token: eos
  assert t.eos_ids == (im_end, endoftext) and t.stop_sequences == ((endoftext,),)
  assert t.bos_id is None
  text = "What is 12 + 7? \\boxed{19}"
  ids = t.encode(text)
  assert all(isinstance(i, int) for i in ids) and im_end not in ids
  assert t.decode(ids) == text
  # Cut at the first end id (eos or an extra one); special tokens skipped.
  assert t.decode(ids + [im_end] + t.encode("junk")) == text
  assert t.decode(np.asarray(ids + [endoftext] + ids)) == text
  assert t.decode([t.tokenizer.convert_tokens_to_ids("<|im_start|>")] + ids) == text
  assert HFTokenizer(tiny_tokenizer(pad=True)).pad_id == endoftext


def test_hf_tokenizer_chat():
  t = HFTokenizer(tiny_tokenizer())
  assert t.has_chat_template
  assert t.chat("Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
  assert t.chat("Hi?", system="Be brief.") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
      "<|im_start|>assistant\n")
  # Special-token strings of the template encode to their ids.
  ids = t.encode(t.chat("Hi?"))
  assert ids[0] == t.tokenizer.convert_tokens_to_ids("<|im_start|>")
  raw = HFTokenizer(tiny_tokenizer(chat_template=False))
  assert not raw.has_chat_template
  assert raw.chat("Hi?") == "Hi?" and raw.chat("Hi?", system="S") == "S\n\nHi?"
  with pytest.raises(ValueError, match="chat template"):
    raw.chat([{"role": "user", "content": "Hi?"}])


def test_hf_tokenizer_without_eos_is_an_error():
  fast = tiny_tokenizer()
  fast.eos_token = None
  with pytest.raises(ValueError, match="no eos_token"):
    HFTokenizer(fast)


def test_generation_eos_ids(tmp_path):
  assert lm_tasks.generation_eos_ids(str(tmp_path)) == ()
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
  assert lm_tasks.generation_eos_ids(str(tmp_path)) == (5, 7)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
  assert lm_tasks.generation_eos_ids(str(tmp_path)) == (3,)


# --------------------------------------------------------------------------- PromptFileTask


def test_prompt_file_task_jsonl_tokens_and_split(tmp_path):
  tok = HFTokenizer(tiny_tokenizer())
  path = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
  task = PromptFileTask(path, tok, system_prompt="Be brief.", heldout_fraction=0.2,
                        split_seed=3, max_answer_len=12)
  assert task.tokenizer is tok and task.max_answer_len == 12
  assert task.prompts == [r["prompt"] for r in PROBLEMS]
  assert task.answers == [r["answer"] for r in PROBLEMS]
  assert task.chat_prompts[0] == tok.chat(PROBLEMS[0]["prompt"], system="Be brief.")
  tr, ho = task.split_ids["train"], task.split_ids["heldout"]
  assert len(ho) == 2 and len(tr) == 8 and not set(tr) & set(ho)
  assert sorted([*tr, *ho]) == list(range(10))
  # Seeded: the same seed gives the same split, another seed (here) another one.
  again = PromptFileTask(path, tok, heldout_fraction=0.2, split_seed=3)
  np.testing.assert_array_equal(again.split_ids["heldout"], ho)
  other = [tuple(PromptFileTask(path, tok, heldout_fraction=0.2, split_seed=s)
                 .split_ids["heldout"]) for s in range(4, 10)]
  assert any(o != tuple(ho) for o in other)
  # Left-padded tokens: each row ends with its full prompt; the width is the longest one.
  lengths = [len(tok.encode(c)) for c in task.chat_prompts]
  assert task.max_prompt_len == max(lengths)
  pt, pm = task.prompt_tokens([0, 5, 5])
  assert pt.dtype == np.int32 and pt.shape == (3, max(lengths)) and pm.dtype == bool
  for r, i in enumerate([0, 5, 5]):
    assert pm[r].sum() == lengths[i] and pm[r, -1]
    assert pt[r, pm[r]].tolist() == tok.encode(task.chat_prompts[i])
    assert (pt[r, ~pm[r]] == tok.pad_id).all()
  # Sampling and evaluation ids come from the right split; eval ids are fixed.
  ids = task.sample_ids("heldout", 50, np.random.default_rng(0))
  assert set(ids) <= set(ho)
  np.testing.assert_array_equal(task.eval_ids("train", 4, 0), task.eval_ids("train", 4, 0))
  assert set(task.eval_ids("train", 100, 0)) == set(tr)
  with pytest.raises(ValueError, match="split='test'"):
    task.sample_ids("test", 1, np.random.default_rng(0))


def test_prompt_file_task_json_aliases_split_field_and_answers(tmp_path):
  tok = HFTokenizer(tiny_tokenizer())
  rows = [{"question": "What is 1 + 1?", "solution": "1 + 1 = \\boxed{2}", "split": "train"},
          {"question": "What is 2 + 2?", "solution": "2 + 2 = 4 #### 4", "split": "test"},
          {"question": "What is 3 + 3?", "solution": 6, "split": "TRAIN"},
          {"question": "What is 4 + 4?", "solution": " 8 ", "split": "validation"}]
  path = tmp_path / "p.json"
  path.write_text(json.dumps(rows))
  task = PromptFileTask(path, tok, use_chat_template=False)
  assert task.prompts == [r["question"] for r in rows]
  assert task.chat_prompts == task.prompts
  assert task.answers == ["2", "4", "6", "8"]
  assert task.split_ids["train"].tolist() == [0, 2]
  assert task.split_ids["heldout"].tolist() == [1, 3]
  # A .json file holding JSON lines (what `datasets` writes) and nested dotted keys with
  # chat-message prompts (the verl layout).
  nested = [{"prompt": [{"role": "user", "content": f"What is {i} * 2?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(3)]
  p2 = write_jsonl(tmp_path / "lines.json", nested)
  t2 = PromptFileTask(p2, tok, heldout_fraction=0.0)
  assert t2.answers == ["0", "2", "4"] and t2.prompts[1] == "What is 1 * 2?"
  assert t2.chat_prompts[1] == tok.chat("What is 1 * 2?")
  assert len(t2.split_ids["heldout"]) == 0 and len(t2.split_ids["train"]) == 3


def test_prompt_file_task_errors_name_file_and_row(tmp_path):
  tok = HFTokenizer(tiny_tokenizer())
  missing = tmp_path / "absent.jsonl"
  with pytest.raises(FileNotFoundError, match=r"absent\.jsonl.*\.jsonl.*\.json.*\.parquet"):
    PromptFileTask(missing, tok)
  with pytest.raises(ValueError, match=r"\.csv"):
    PromptFileTask(tmp_path / "p.csv", tok)
  p = write_jsonl(tmp_path / "bad.jsonl", PROBLEMS[:2] + [{"prompt": "x", "label": "1"}])
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: no 'answer' key; keys found: "
                                       r"\['label', 'prompt'\]"):
    PromptFileTask(p, tok)
  p = write_jsonl(tmp_path / "nokey.jsonl", [{"text": "x", "answer": "1"}])
  with pytest.raises(ValueError, match=r"nokey\.jsonl, line 1: no prompt key 'prompt'.*"
                                       r"keys found: \['answer', 'text'\]"):
    PromptFileTask(p, tok)
  p = tmp_path / "blank.jsonl"
  p.write_text(json.dumps(PROBLEMS[0]) + "\n\n{not json\n")
  with pytest.raises(ValueError, match=r"blank\.jsonl, line 3: invalid JSON"):
    PromptFileTask(p, tok)
  p = tmp_path / "latin1.jsonl"
  p.write_bytes((json.dumps(PROBLEMS[0]) + "\n").encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
  first = len(json.dumps(PROBLEMS[0])) + 1
  with pytest.raises(ValueError, match=rf"latin1\.jsonl: not UTF-8 text at line 2 \(byte offset "
                                       rf"{first + 15}: b'\\xe9"):
    PromptFileTask(p, tok)
  p = tmp_path / "obj.json"
  p.write_text(json.dumps({"prompt": "x", "answer": "1"}))
  with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of objects"):
    PromptFileTask(p, tok)
  p = tmp_path / "split.json"
  p.write_text(json.dumps([dict(PROBLEMS[0], split="train"), PROBLEMS[1]]))
  with pytest.raises(ValueError, match=r"split\.json, row 1: no 'split' field"):
    PromptFileTask(p, tok)
  p.write_text(json.dumps([dict(PROBLEMS[0], split="train"), dict(PROBLEMS[1], split="dev2")]))
  with pytest.raises(ValueError, match=r"split\.json, row 1: split='dev2'"):
    PromptFileTask(p, tok)
  p.write_text(json.dumps([dict(PROBLEMS[0], answer=None)]))
  with pytest.raises(ValueError, match=r"split\.json, row 0: 'answer' is None"):
    PromptFileTask(p, tok)
  long = write_jsonl(tmp_path / "long.jsonl",
                     PROBLEMS[:2] + [{"prompt": "What is 1 + 1? " * 30, "answer": "2"}])
  with pytest.raises(ValueError, match=r"long\.jsonl: 1 prompt\(s\) longer than "
                                       r"max_prompt_len=40 tokens.*line 3 \(\d+ tokens\)"):
    PromptFileTask(long, tok, max_prompt_len=40)


def test_parquet_without_reader_is_a_clear_import_error(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_parquet(name, *a, **kw):
    if name.split(".")[0] in ("pyarrow", "pandas"):
      raise ImportError(name)
    return real_import(name, *a, **kw)

  p = tmp_path / "p.parquet"
  p.write_bytes(b"PAR1")
  monkeypatch.setattr(builtins, "__import__", no_parquet)
  with pytest.raises(ImportError, match=r"p\.parquet needs `pyarrow` or `pandas`"):
    lm_tasks.read_rows(str(p))


def test_reward_scored_accuracy_matches_exact_match_default():
  texts, answers = ["12", "The answer is \\boxed{7}.", "8 "], ["12", "7", "8"]
  assert arith_eval.score_texts(texts, answers).tolist() == [1.0, 0.0, 0.0]
  from rft.rewards import base
  r = base.build("math_answer")
  assert arith_eval.score_texts(texts, answers, r).tolist() == [1.0, 1.0, 1.0]


def test_required_config_values_are_named():
  c = config_lib.load("grpo", "hf_math")
  with pytest.raises(ValueError, match=r"config\.model_path .*--config\.model_path=.*"
                                       r"config\.prompt_file"):
    config_lib.check_required(c)
  c = config_lib.load("grpo", "smoke,hf_math")
  assert c.steps == 2 and c.sampling.max_new_tokens == 8 and c.reward == "math_answer"


# --------------------------------------------------------------------------- end to end


def _tiny_qwen(directory):
  import torch
  tok = tiny_tokenizer()
  hf_config = transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      max_position_embeddings=256, eos_token_id=tok.eos_token_id)
  hf_config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():  # non-trivial norms and biases, varied greedy outputs
      p.add_(0.3 * torch.randn(p.shape, generator=g))
  model.save_pretrained(directory, safe_serialization=True)
  tok.save_pretrained(directory)
  (directory / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]}))
  return model


def test_greedy_completions_match_transformers(tmp_path):
  """Prompt file -> chat template -> left-padded batch -> rft sampler, against
  transformers' own greedy generate on each prompt alone."""
  import torch
  model = _tiny_qwen(tmp_path / "m")
  tok = HFTokenizer(hf_lm.load_tokenizer(str(tmp_path / "m")),
                    extra_eos_ids=lm_tasks.generation_eos_ids(str(tmp_path / "m")))
  rows = [{"prompt": "What is 1 + 2?", "answer": "3"},
          {"prompt": "Please reason step by step: what is 12 + 7?", "answer": "19"},
          {"prompt": "0 * 9 = ?", "answer": "0"}]
  task = PromptFileTask(write_jsonl(tmp_path / "p.jsonl", rows), tok, heldout_fraction=0.0,
                        system_prompt="Be brief.")
  lm_config, params = hf_lm.load_lm(str(tmp_path / "m"))
  ids = np.arange(3)
  texts = arith_eval.generate_texts(lm_config, params, task, ids, jax.random.key(0),
                                    greedy=True, max_new_tokens=10)
  for i in ids:
    prompt = torch.tensor([tok.encode(task.chat_prompts[i])])
    with torch.no_grad():
      out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=10, eos_token_id=list(tok.eos_ids),
                           pad_token_id=tok.pad_id)
    want = tok.decode(out[0, prompt.shape[1]:].tolist())
    assert texts[i] == want, (i, texts[i], want)
  assert len(set(texts)) > 1, texts  # the comparison is not vacuous


def test_hf_math_smoke_on_a_tiny_qwen(tmp_path):
  model_dir = tmp_path / "tiny_qwen"
  _tiny_qwen(model_dir)
  problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS[:8])
  wd = tmp_path / "run"
  args = [f"--config.model_path={model_dir}", f"--config.prompt_file={problems}"]
  # RAFT: a random model never answers right, so GRPO's advantages (and its update) would
  # be zero; RAFT with min_reward -1e9 finetunes on the best of each group whatever the
  # rewards, so the params must move. Same loop, same export.
  config = "configs/grpo.py:smoke,hf_math,raft"
  args.append("--config.objective.min_reward=-1e9")
  run_main(config, wd, *args)
  with open(wd / "results.json") as f:
    r = json.load(f)
  assert r["objective"] == "raft"
  assert set(r["history"]) == {"0", "2"} and r["completions_per_step"] == 8
  for h in r["history"].values():
    assert 0.0 <= h["train/accuracy_greedy"] <= 1.0
    assert 0.0 <= h["heldout/accuracy_sampled"] <= 1.0
  assert (wd / "checkpoints").is_dir()
  out = wd / "hf_model"
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json", "rft_meta.json"):
    assert (out / name).is_file(), name
  assert not (wd / "arith_base.msgpack").exists()
  cfg0, base = hf_lm.load_lm(str(model_dir))
  cfg1, tuned = hf_lm.load_lm(str(out))
  assert cfg1 == cfg0
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base),
                                                           jax.tree.leaves(tuned)))
  assert moved > 0
  tok = hf_lm.load_tokenizer(str(out))
  assert tok.chat_template and len(tok) == len(tiny_tokenizer())
  # Resume: a finished run restarts from its last checkpoint and does no more steps.
  p = run_main(config, wd, *args)
  assert "resumed" in p.stderr


def test_hf_math_without_paths_names_the_missing_values(tmp_path):
  p = run_main("configs/grpo.py:smoke,hf_math", tmp_path / "a", check=False)
  assert p.returncode != 0 and "config.model_path" in p.stderr
  assert "config.prompt_file" in p.stderr
  p = run_main("configs/grpo.py:smoke", tmp_path / "b", "--config.model_path=/nowhere",
               check=False)
  assert p.returncode != 0 and "config.prompt_file" in p.stderr
