"""The statistics of comparisons against cases computed by hand (closed forms written out here, exact binomial sums
with math.comb) and a published example, not against scipy's own output."""

from __future__ import annotations

import math

import pytest

from spatial_mllm.evaluation.statistics import (
    PairedTable,
    holm_adjust,
    mcnemar_exact,
    paired_comparison,
    paired_difference_interval,
    seed_spread,
    wilson_interval,
)

Z = 1.959963984540054  # the standard normal's 97.5% quantile
T_2 = 4.302652729749464  # Student t's 97.5% quantile with 2 degrees of freedom


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


def two_sided_binomial_half(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (symmetric: twice the smaller tail)."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("k", "n", "expected"), [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0))])
def test_wilson_interval(k, n, expected):
    found = wilson_interval(k, n)
    assert (found.low, found.high) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    assert (found.low, found.high) == pytest.approx(expected, abs=5e-5)
    assert found.contains(k / n)


@pytest.mark.parametrize(("k", "n", "message"), [(11, 10, "exceeds total"), (0, 0, "over 0 questions"), (-1, 5, "non-negative")])
def test_wilson_refuses_impossible_counts(k, n, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(k, n)


@pytest.mark.parametrize(
    ("only_a", "only_b", "expected"),
    [
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.0386: significant at 0.05
        (2, 10, 2 * (1 + 12 + 66) / 4096),  # symmetric
        (5, 0, 2 / 32),  # 0.0625: five of five discordant is not enough
        (6, 0, 2 / 64),  # 0.03125: six is
        (3, 3, 1.0),
        (0, 0, 1.0),  # no discordant question: no evidence either way
    ],
)
def test_exact_mcnemar(only_a, only_b, expected):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(only_a, only_b) == pytest.approx(two_sided_binomial_half(only_a, only_a + only_b), rel=1e-12)


def test_newcombe_paired_interval_matches_the_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: the paired table
    # [[59, 6], [16, 80]] gives -0.0621 (95% CI -0.1186 to -0.0046) by Newcombe's square-and-add (hybrid score).
    result = paired_comparison(PairedTable(both=59, only_a=6, only_b=16, neither=80))
    assert result.difference == pytest.approx(-10 / 161)
    assert (result.interval.low, result.interval.high) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    assert result.p_value == pytest.approx(two_sided_binomial_half(6, 22))  # 0.052: the test and interval may differ


def test_newcombe_interval_by_hand():
    # Correlated pair: both*neither - only_a*only_b = 900 - 400 = 500 > n/2 = 50, so the corrected
    # phi = (500 - 50) / sqrt(50 * 50 * 50 * 50) = 0.18 narrows the square-and-add of the two Wilson intervals.
    low, high = wilson_by_hand(50, 100)
    half = math.sqrt(2 * (0.5 - low) ** 2 - 2 * 0.18 * (0.5 - low) * (high - 0.5))
    found = paired_difference_interval(PairedTable(both=30, only_a=20, only_b=20, neither=30))
    assert (found.low, found.high) == pytest.approx((-half, half), abs=1e-12)
    # Uncorrelated (625 - 625 = 0 <= n/2 counts as phi = 0): plain square and add.
    half = math.sqrt((0.5 - low) ** 2 + (high - 0.5) ** 2)
    found = paired_difference_interval(PairedTable(both=25, only_a=25, only_b=25, neither=25))
    assert (found.low, found.high) == pytest.approx((-half, half), abs=1e-12)
    # Unequal accuracies (0.7 and 0.5; cross product 40*20 - 30*10 = 500 > 50, phi = 450 / sqrt(70*30*50*50)).
    low_a, high_a = wilson_by_hand(70, 100)
    phi = 450 / math.sqrt(70 * 30 * 50 * 50)
    below = math.sqrt((0.7 - low_a) ** 2 - 2 * phi * (0.7 - low_a) * (high - 0.5) + (high - 0.5) ** 2)
    above = math.sqrt((high_a - 0.7) ** 2 - 2 * phi * (high_a - 0.7) * (0.5 - low) + (0.5 - low) ** 2)
    found = paired_difference_interval(PairedTable(both=40, only_a=30, only_b=10, neither=20))
    assert (found.low, found.high) == pytest.approx((0.2 - below, 0.2 + above), abs=1e-12)


def test_no_discordant_question_still_has_an_interval():
    result = paired_comparison(PairedTable(both=5, only_a=0, only_b=0, neither=5))
    assert result.difference == 0 and result.p_value == 1.0
    assert result.interval.low < 0 < result.interval.high  # unlike a percentile bootstrap, not [0, 0]


def test_paired_table_from_outcomes():
    table = PairedTable.from_outcomes([1, 1, 0, 0, 1], [True, False, True, False, False])
    assert (table.both, table.only_a, table.only_b, table.neither) == (1, 2, 1, 1)
    assert (table.correct_a, table.correct_b, table.total, table.difference) == (3, 2, 5, pytest.approx(0.2))
    with pytest.raises(ValueError, match="differ in length: 2 and 1"):
        PairedTable.from_outcomes([1, 0], [1])


def test_holm_adjustment():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([0.02]) == [0.02]  # one test: nothing to correct
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm_adjust([1.5])


def test_seed_spread():
    spread = seed_spread([0.5, 0.6, 0.7])
    assert (spread.mean, spread.sd, spread.minimum, spread.maximum, spread.seeds) == pytest.approx((0.6, 0.1, 0.5, 0.7, 3))
    half = T_2 * 0.1 / math.sqrt(3)
    assert (spread.interval.low, spread.interval.high) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-9)
    same = seed_spread([0.4, 0.4])
    assert (same.sd, same.interval.low, same.interval.high) == (0.0, 0.4, 0.4)
    with pytest.raises(ValueError, match="at least 2 values"):
        seed_spread([0.5])
