"""A benchmark cell's verdict from its rounds, with the machine's noise in it.

On the shared 2-core machines this project is measured on, single rounds of a cell spread by
±0.1 around medians that sit within a few hundredths of their targets; a verdict on the median
alone then reads "met" in one run and "MISSED" in the next.  Here the verdict is on a
distribution-free confidence interval of the median (order statistics: the number of rounds
below the true median is Binomial(n, 1/2)), and says "not resolved" where the interval holds
the target.  It assumes rounds are independent draws, which interleaving the plain and measured
runs approximates; drift over a whole run is not in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["CONFIDENCE", "judge", "median_interval", "verdict", "worst"]

CONFIDENCE = 0.90


def _binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """(low, high): order statistics x_(k), x_(n+1-k) (1-based) that hold the median with at
    least ``confidence``, k the largest with P(X < k) <= (1 - confidence) / 2.  ``None`` where
    there are too few values for any such interval (under 5 at 90%)."""
    xs = sorted(values)
    n = len(xs)
    tail = (1.0 - confidence) / 2.0
    k = 0
    while k + 1 <= n // 2 and _binomial_cdf(k, n) <= tail:  # P(X < k + 1) = P(X <= k)
        k += 1
    if k == 0:
        return None
    return xs[k - 1], xs[n - k]


def judge(values: Sequence[float], target: float) -> str:
    """ "met" where the median's interval lies at or below ``target``, "MISSED" where it lies
    above, else "not resolved" (this run cannot tell; also with too few rounds)."""
    interval = median_interval(values)
    if interval is None:
        return "not resolved"
    low, high = interval
    return "met" if high <= target else "MISSED" if low > target else "not resolved"


def worst(words: Sequence[str]) -> str:
    """The verdict of several cells together: MISSED if one is, met if all are."""
    if "MISSED" in words:
        return "MISSED"
    return "met" if words and all(w == "met" for w in words) else "not resolved"


def verdict(values: Sequence[float], target: float, unit: str = "x") -> str:
    """:func:`judge` with the target and the interval, for a cell's line."""
    interval = median_interval(values)
    word = judge(values, target)
    if interval is None:
        return f"target {target:.2f}{unit}: {word} ({len(values)} rounds: too few)"
    low, high = interval
    return (
        f"target {target:.2f}{unit}: {word}; "
        f"median's {CONFIDENCE:.0%} interval {low:.3f}-{high:.3f}{unit}"
    )
