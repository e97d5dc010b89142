"""Intervals over seeds and verdicts on claims.

With n seeds x_1..x_n of a quantity, its 95 % interval is the Student-t interval

    mean ± t_{0.975, n−1} · sd / sqrt(n),      sd with n − 1 in the denominator.

A comparison of two rows uses the per-seed differences d_s = a_s − b_s (rows of one
seed share the base model, its evaluation noise and the prompts each epoch draws), so
its interval is the t interval of d. A claim's verdict reads off that interval:

* `gt`  (A > B):   holds if the interval is above 0, does not hold if it is below 0.
* `pos` (A > 0):   the same for one row's change (e.g. its gain over the base model).
* `geq` (A ≥ B − margin, non-inferiority): holds if the interval is above −margin,
                   does not hold if it is below −margin. With margin 0 it reads as
                   "A is not worse than B".

Everything else is "inconclusive": the interval overlaps the boundary, or fewer than
two seeds finished.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"

# Two-sided 95 % Student-t quantiles t_{0.975, df}; beyond 30, the normal 1.96 is within 4 %.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
  """t_{0.975, df}; for df between table entries the next smaller df (a wider interval)."""
  if df < 1:
    raise ValueError(f"an interval needs at least 2 values (df >= 1), got df={df}")
  if df > 30:
    return 1.96
  return _T975[max(k for k in _T975 if k <= df)]


@dataclasses.dataclass(frozen=True)
class Interval:
  mean: float
  low: float
  high: float
  n: int

  def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
    """'41.3 [38.0, 44.6]' (or '41.3' for one value)."""
    f = lambda v: f"{v * scale:.{digits}f}"
    if self.n < 2:
      return f(self.mean)
    return f"{f(self.mean)} [{f(self.low)}, {f(self.high)}]"


def interval(values) -> Interval:
  """Mean and 95 % t interval of finite values (low = high = mean for one value)."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if len(x) == 0:
    return Interval(float("nan"), float("nan"), float("nan"), 0)
  m = float(x.mean())
  if len(x) < 2:
    return Interval(m, m, m, 1)
  h = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
  return Interval(m, m - h, m + h, len(x))


def verdict(kind: str, iv: Interval, margin: float = 0.0) -> str:
  """holds / does not hold / inconclusive for a claim on the interval `iv` (module doc)."""
  if iv.n < 2:
    return INCONCLUSIVE
  if kind in ("gt", "pos"):
    return HOLDS if iv.low > 0 else FAILS if iv.high < 0 else INCONCLUSIVE
  if kind == "geq":
    return HOLDS if iv.low > -margin else FAILS if iv.high < -margin else INCONCLUSIVE
  raise ValueError(f"unknown claim kind {kind!r}; use gt, pos or geq")
