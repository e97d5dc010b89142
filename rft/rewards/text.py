"""Rewards for language models: verifiable math answers, exact match, output format.

Same interface as the image rewards (rft.rewards.base), with text in place of images:

    reward(completions: list[str], targets) -> scores [N] float32 (1.0 / 0.0)

`targets` is a sequence of per-completion target strings, or a mapping holding them
under "answers" (format rewards ignore it). All are host rewards: Python string code
run outside jit, not differentiable.

math_answer (RL with verifiable rewards, as in DeepSeekMath / DeepSeek-R1 / Tülu 3):
the final answer is the last \\boxed{...} of the completion, else the content of the
last <answer>...</answer>, else the text after the last "####" (GSM8K) or "answer:",
else the last number. Answer and target are normalised (whitespace, "$", thousands
separators, trailing ".", leading "+", \\frac{a}{b} -> a/b) and are equal when the strings
are, or when both parse as the same rational number ("3/4" == "0.75" == "0.750").
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

from rft.rewards.base import Reward, register

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PREFIX = re.compile(r"answer\s*:", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(\d),(\d{3})(?!\d)")


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (nested braces allowed), None if there is none."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i = start + len("\\boxed{")
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None  # unbalanced: no answer


def extract_answer(completion: str) -> str | None:
  """The final answer of a completion (see the module docstring), None if none is found."""
  boxed = last_boxed(completion)
  if boxed is not None:
    return boxed
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    return tags[-1]
  hashes = completion.rfind("####")
  prefixes = list(_ANSWER_PREFIX.finditer(completion))
  for start in (hashes + 4 if hashes >= 0 else None, prefixes[-1].end() if prefixes else None):
    if start is not None:
      line = completion[start:].strip().split("\n", 1)[0].strip()
      if line:
        return line
  numbers = _NUMBER.findall(completion)
  return numbers[-1] if numbers else None


def normalize_answer(text: str) -> str:
  """Canonical string form of an answer (see the module docstring)."""
  s = str(text).replace("\\$", "").strip().strip("$").strip()
  if s.startswith("\\text{") and s.endswith("}"):
    s = s[len("\\text{"):-1]
  s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
  prev = None
  while prev != s:
    prev, s = s, _FRAC.sub(r"(\1)/(\2)", s)
  s = re.sub(r"\s+", "", s)
  s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)  # (3)/(4) -> 3/4
  prev = None
  while prev != s:
    prev, s = s, _THOUSANDS.sub(r"\1\2", s)
  s = s.rstrip(".")
  if s.startswith("+"):
    s = s[1:]
  return s


def _as_number(s: str) -> Fraction | None:
  try:
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def answers_equal(answer: str | None, target: str) -> bool:
  """Normalised string equality, or numeric equality when both are numbers."""
  if answer is None:
    return False
  a, t = normalize_answer(answer), normalize_answer(target)
  if a == t:
    return True
  x, y = _as_number(a), _as_number(t)
  return x is not None and y is not None and x == y


def _targets(targets, n: int) -> list:
  if isinstance(targets, Mapping):
    if "answers" not in targets:
      raise ValueError(f"text reward targets mapping has no 'answers' key; keys: "
                       f"{sorted(targets)}")
    targets = targets["answers"]
  targets = list(targets)
  if len(targets) != n:
    raise ValueError(f"{n} completions but {len(targets)} targets")
  return targets


def prompts_of(targets, n: int, name: str, hint: str = "") -> list[str]:
  """The n prompts in `targets["prompts"]` (rewards that read the prompt: reward models,
  judges); an error naming reward `name` (plus `hint`) when they are missing or miscounted."""
  if not isinstance(targets, Mapping) or "prompts" not in targets:
    got = (f"a mapping with keys {sorted(targets)}" if isinstance(targets, Mapping)
           else f"a {type(targets).__name__}")
    raise ValueError(f"{name} needs each completion's prompt: targets must be a mapping "
                     f"holding 'prompts', got {got}{hint}")
  prompts = [str(p) for p in targets["prompts"]]
  if len(prompts) != n:
    raise ValueError(f"{name}: {n} completions but {len(prompts)} prompts")
  return prompts


def math_answer(completions: Sequence[str], targets) -> np.ndarray:
  """1.0 where the extracted final answer equals the target answer, else 0.0."""
  ts = _targets(targets, len(completions))
  return np.array([float(answers_equal(extract_answer(str(c)), str(t)))
                   for c, t in zip(completions, ts)], np.float32)


def exact_match(completions: Sequence[str], targets) -> np.ndarray:
  """1.0 where the completion's first line (stripped) equals the stripped target."""
  ts = _targets(targets, len(completions))
  return np.array([float(str(c).strip().split("\n", 1)[0].strip() == str(t).strip())
                   for c, t in zip(completions, ts)], np.float32)


def format_match(completions: Sequence[str], pattern: str = DEFAULT_FORMAT_PATTERN,
                 full: bool = True) -> np.ndarray:
  """1.0 where `pattern` (DOTALL) matches the whole stripped completion (full) or
  anywhere in it (not full)."""
  rx = re.compile(pattern, re.DOTALL)
  match = rx.fullmatch if full else rx.search
  return np.array([float(match(str(c).strip()) is not None) for c in completions], np.float32)


@register("math_answer")
def math_answer_reward() -> Reward:
  """Verifiable math reward: 1 if the final answer equals the target (host)."""
  return Reward("math_answer", math_answer, differentiable=False, host=True)


@register("exact_match")
def exact_match_reward() -> Reward:
  """1 if the completion's first line is exactly the target (host)."""
  return Reward("exact_match", exact_match, differentiable=False, host=True)


@register("format")
def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN, full: bool = True) -> Reward:
  """1 if the completion matches `pattern` (default <think>…</think><answer>…</answer>)."""
  re.compile(pattern)  # a bad pattern fails here, at build time

  def fn(completions, targets):
    return format_match(completions, pattern, full)

  return Reward("format", fn, differentiable=False, host=True)
