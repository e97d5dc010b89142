"""Minibatch slicing shared by the online loops (diffusion and LM)."""
from __future__ import annotations

import numpy as np


def minibatches(order: np.ndarray, size: int, count: int):
  """`count` consecutive slices of `size` from `order`, cycling through it."""
  for k in range(count):
    start = (k * size) % len(order)
    yield order[start:start + size]


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
  """Row indices of whole groups in a group-contiguous batch: group g is rows
  [g * group_size, (g + 1) * group_size)."""
  return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
