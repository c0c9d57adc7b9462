"""The benchmarks' verdicts (benchmarks/_verdict.py): a confidence interval of the median."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _verdict import judge, median_interval, verdict, worst


@pytest.mark.parametrize("n", [5, 9, 11, 21])
def test_interval_holds_the_median_as_often_as_it_claims(n):
    # Independent of the binomial sums: draws of a known distribution (uniform, median 0.5),
    # 20000 intervals.  At 90% asked, the order statistics give at least 90% (5 rounds: 93.75%,
    # 9: 96.1%, 11: 93.5%, 21: 92.2%); the Monte Carlo error is about 0.2%.
    rng = np.random.default_rng(n)
    draws = rng.random((20000, n))
    held = 0
    for row in draws:
        interval = median_interval(row.tolist())
        assert interval is not None
        held += interval[0] <= 0.5 <= interval[1]
    coverage = held / len(draws)
    assert coverage >= 0.89
    # ...and the interval is the narrowest such: one order statistic further in falls below.
    xs = np.sort(draws, axis=1)
    ranks = median_interval(list(range(n)))  # ranks of the order statistics chosen
    assert ranks is not None
    k = int(ranks[0]) + 1  # 1-based rank of the low end
    if k + 1 <= n // 2:
        narrower = np.mean((xs[:, k] <= 0.5) & (xs[:, n - k - 1] >= 0.5))
        assert narrower < 0.9


def test_too_few_rounds_give_no_interval():
    assert median_interval([1.0, 1.1, 1.2, 1.3]) is None
    assert judge([1.0, 1.0, 1.0], 1.05) == "not resolved"
    assert "too few" in verdict([1.0, 1.0], 1.05)


def test_verdict_on_each_side_of_the_target_and_across_it():
    assert judge([1.01, 1.02, 1.02, 1.03, 1.04], 1.05) == "met"
    assert judge([1.06, 1.07, 1.08, 1.08, 1.09], 1.05) == "MISSED"
    assert judge([1.00, 1.03, 1.05, 1.07, 1.10], 1.05) == "not resolved"
    line = verdict([1.06, 1.07, 1.08, 1.08, 1.09], 1.05)
    assert line.startswith("target 1.05x: MISSED") and "1.060-1.090x" in line
    assert worst(["met", "not resolved"]) == "not resolved"
    assert worst(["met", "MISSED", "not resolved"]) == "MISSED"
    assert worst(["met", "met"]) == "met"
    assert worst([]) == "not resolved"
