"""Uncertainty for accuracies: Wilson intervals, the paired comparison of two models on the same questions, Holm's
correction for many tests at once, and the spread of a measure across training seeds.

Choices, so that a report says what it computed:
- One accuracy (k right of n): the Wilson score interval (scipy's `binomtest(...).proportion_ci("wilson")`), which
  keeps its coverage near 95% for small n and accuracies near 0 or 1, where the normal approximation does not.
- Two models on the same n questions: the 2x2 table of (A right?, B right?). The test is McNemar's, exact: under "no
  difference" each discordant question (one right, the other wrong) is a fair coin, so the p-value is the two-sided
  binomial test of `only_a` among `only_a + only_b` at 1/2. The interval of the difference of accuracies is
  Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10: both Wilson intervals combined
  with the continuity-corrected correlation of the pair). It is closed-form and deterministic, so a report reads
  the same on every run (a bootstrap would depend on its seed), and it behaves at 0 discordant questions, where a
  percentile bootstrap collapses to [0, 0].
- Many tests at once: Holm's step-down adjustment, valid whatever the dependence between the tests (the tests of
  one report share questions and models).
- Several seeds: mean, sample standard deviation, and the Student-t 95% interval of the mean across seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_count(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of the accuracy `correct / total`."""
    _check_count(correct, "correct")
    _check_count(total, "total")
    if total == 0:
        raise ValueError("an accuracy over 0 questions has no interval")
    if correct > total:
        raise ValueError(f"correct ({correct}) exceeds total ({total})")
    found = stats.binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(float(found.low), float(found.high))


@dataclass(frozen=True)
class PairedTable:
    """Two models on the same questions: how many both got right, only A, only B, neither."""

    both: int
    only_a: int
    only_b: int
    neither: int

    def __post_init__(self) -> None:
        for name in ("both", "only_a", "only_b", "neither"):
            _check_count(getattr(self, name), name)
        if self.total == 0:
            raise ValueError("a paired comparison needs at least one question")

    @classmethod
    def from_outcomes(cls, correct_a: Sequence[bool], correct_b: Sequence[bool]) -> "PairedTable":
        """From per-question outcomes in the same question order."""
        if len(correct_a) != len(correct_b):
            raise ValueError(f"paired outcomes differ in length: {len(correct_a)} and {len(correct_b)}")
        pairs = [(bool(a), bool(b)) for a, b in zip(correct_a, correct_b)]
        return cls(
            both=pairs.count((True, True)),
            only_a=pairs.count((True, False)),
            only_b=pairs.count((False, True)),
            neither=pairs.count((False, False)),
        )

    @property
    def total(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def correct_a(self) -> int:
        return self.both + self.only_a

    @property
    def correct_b(self) -> int:
        return self.both + self.only_b

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B."""
        return (self.only_a - self.only_b) / self.total


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    _check_count(only_a, "only_a")
    _check_count(only_b, "only_b")
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_a, discordant, 0.5, alternative="two-sided").pvalue)


def paired_difference_interval(table: PairedTable, confidence: float = CONFIDENCE) -> Interval:
    """Newcombe's hybrid score interval (method 10) for accuracy(A) - accuracy(B) on the same questions."""
    n = table.total
    p_a, p_b = table.correct_a / n, table.correct_b / n
    a = wilson_interval(table.correct_a, n, confidence)
    b = wilson_interval(table.correct_b, n, confidence)
    phi = _corrected_phi(table)
    # The distance from each estimate to its own Wilson limits, combined as for a difference of correlated estimates.
    below = math.sqrt(max(0.0, (p_a - a.low) ** 2 - 2 * phi * (p_a - a.low) * (b.high - p_b) + (b.high - p_b) ** 2))
    above = math.sqrt(max(0.0, (a.high - p_a) ** 2 - 2 * phi * (a.high - p_a) * (p_b - b.low) + (p_b - b.low) ** 2))
    difference = p_a - p_b
    return Interval(max(-1.0, difference - below), min(1.0, difference + above))


def _corrected_phi(table: PairedTable) -> float:
    """The phi correlation of the 2x2 table with Newcombe's continuity correction (0 when a margin is empty)."""
    a_right, a_wrong = table.correct_a, table.only_b + table.neither
    b_right, b_wrong = table.correct_b, table.only_a + table.neither
    margins = a_right * a_wrong * b_right * b_wrong
    if margins == 0:
        return 0.0
    cross = table.both * table.neither - table.only_a * table.only_b
    if cross > table.total / 2:
        cross -= table.total / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison: the table, A - B with its interval, and the exact McNemar p-value."""

    table: PairedTable
    difference: float
    interval: Interval
    p_value: float


def paired_comparison(table: PairedTable, confidence: float = CONFIDENCE) -> PairedResult:
    return PairedResult(
        table=table,
        difference=table.difference,
        interval=paired_difference_interval(table, confidence),
        p_value=mcnemar_exact(table.only_a, table.only_b),
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: reject where the adjusted value is below alpha."""
    for value in p_values:
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"p-values must lie in [0, 1], got {value!r}")
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class SeedSpread:
    """A measure across training seeds: mean, sample standard deviation, the t interval of the mean, min and max."""

    mean: float
    sd: float
    interval: Interval
    minimum: float
    maximum: float
    seeds: int


def seed_spread(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedSpread:
    """Needs at least two seeds: one seed has no spread to speak of."""
    if len(values) < 2:
        raise ValueError(f"a spread across seeds needs at least 2 values, got {len(values)}")
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1))
    if sd == 0:
        interval = Interval(mean, mean)
    else:
        low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sd / math.sqrt(len(values)))
        interval = Interval(float(low), float(high))
    return SeedSpread(mean, sd, interval, min(values), max(values), len(values))
