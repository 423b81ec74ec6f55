"""Paired comparisons between arms on the same questions, and the best arm, named only when it is significant.

Each test pairs two runs question by question (exact McNemar, Newcombe interval: statistics.py), overall or on
one category group. With seeds, runs of equal seed are paired, and a difference counts as significant only when it
is significant, in the same direction, in every seed. Holm's correction runs over a family of tests of one seed:
the overall tests of a table (every projector against the reference) form one family, its group tests another, so
that the headline comparison is not diluted by the many group tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .arms import Arm
from .runs import OVERALL, RunSummary
from .statistics import SIGNIFICANCE, Interval, PairedTable, holm_adjust, paired_comparison, seed_spread

HIGHER, LOWER = "significantly higher", "significantly lower"
NO_DIFFERENCE, INCONSISTENT = "no significant difference", "not significant in every seed"


@dataclass(frozen=True)
class PairedTest:
    """An arm against a reference arm on the questions of one level (overall or a group), one seed."""

    seed: int | None
    table: PairedTable  # a = the arm, b = the reference
    difference: float  # accuracy of the arm minus the reference's
    interval: Interval  # Newcombe 95%
    p_value: float  # exact McNemar
    p_adjusted: float  # Holm, over its family (table, seed, overall or groups)
    significant: bool

    def to_dict(self) -> dict[str, Any]:
        table = self.table
        return {
            "seed": self.seed,
            "questions": table.total,
            "both_right": table.both,
            "only_arm_right": table.only_a,
            "only_reference_right": table.only_b,
            "both_wrong": table.neither,
            "arm_accuracy": table.correct_a / table.total,
            "reference_accuracy": table.correct_b / table.total,
            "difference": self.difference,
            "low": self.interval.low,
            "high": self.interval.high,
            "p_value": self.p_value,
            "p_holm": self.p_adjusted,
            "significant": self.significant,
        }


@dataclass(frozen=True)
class Versus:
    """An arm against a reference on one level, over the seeds both have."""

    arm: str
    reference: str
    level: str
    tests: tuple[PairedTest, ...]
    verdict: str  # HIGHER, LOWER, NO_DIFFERENCE or INCONSISTENT

    @property
    def difference(self) -> float:
        return sum(test.difference for test in self.tests) / len(self.tests)

    @property
    def interval(self) -> Interval:
        """Newcombe's for one seed; across seeds the t interval of the per-seed differences."""
        if len(self.tests) == 1:
            return self.tests[0].interval
        return seed_spread([test.difference for test in self.tests]).interval

    @property
    def significant(self) -> bool:
        return self.verdict in (HIGHER, LOWER)

    @property
    def significant_seeds(self) -> int:
        return sum(test.significant for test in self.tests)

    def to_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {
            "arm": self.arm,
            "reference": self.reference,
            "level": self.level,
            "difference": self.difference,
            "low": interval.low,
            "high": interval.high,
            "verdict": self.verdict,
            "significant": self.significant,
            "tests": [test.to_dict() for test in self.tests],
        }


def compare_arms(arms: Sequence[Arm], reference: Arm, levels: Sequence[str]) -> list[Versus]:
    """Each arm (other than the reference) against `reference` at each level: OVERALL or a group. Every run needs
    per-question outcomes on the same questions."""
    raw = []  # (arm, level, seed, PairedResult)
    for arm in arms:
        if arm is reference:
            continue
        for seed, run, other in paired_runs(arm, reference):
            reference_right = {outcome.question_id: outcome.correct for outcome in other.outcomes}
            for level in levels:
                pairs = [(outcome.correct, reference_right[outcome.question_id]) for outcome in run.outcomes
                         if level == OVERALL or outcome.group == level]  # fmt: skip
                if pairs:
                    table = PairedTable.from_outcomes([a for a, _ in pairs], [b for _, b in pairs])
                    raw.append((arm.name, level, seed, paired_comparison(table)))
    found: dict[tuple[str, str], list[PairedTest]] = {}
    families = [((seed, level == OVERALL), result.p_value) for _, level, seed, result in raw]
    for (arm_name, level, seed, result), p_adjusted in zip(raw, _holm_per_family(families)):
        test = PairedTest(seed, result.table, result.difference, result.interval, result.p_value, p_adjusted,
                          p_adjusted < SIGNIFICANCE)  # fmt: skip
        found.setdefault((arm_name, level), []).append(test)
    return [Versus(arm, reference.name, level, tuple(tests), verdict(tests)) for (arm, level), tests in found.items()]


def paired_runs(arm: Arm, reference: Arm) -> list[tuple[int | None, RunSummary, RunSummary]]:
    """(seed, arm's run, reference's run): the one run of each, or the runs of equal seed."""
    if len(arm.runs) == 1 and len(reference.runs) == 1:
        run, other = arm.runs[0], reference.runs[0]
        return [(run.seed if run.seed == other.seed else None, run, other)]
    by_seed = {run.seed: run for run in reference.runs}
    return [(run.seed, run, by_seed[run.seed]) for run in arm.runs if run.seed in by_seed]


def verdict(tests: Sequence[PairedTest]) -> str:
    if all(test.significant and test.difference > 0 for test in tests):
        return HIGHER
    if all(test.significant and test.difference < 0 for test in tests):
        return LOWER
    return INCONSISTENT if any(test.significant for test in tests) else NO_DIFFERENCE


def _holm_per_family(p_values: Sequence[tuple[Any, float]]) -> list[float]:
    """Holm-adjusted p-values of (family key, p-value) pairs, each family corrected on its own."""
    adjusted = [0.0] * len(p_values)
    for key in {key for key, _ in p_values}:
        family = [index for index, (found, _) in enumerate(p_values) if found == key]
        for index, value in zip(family, holm_adjust([p_values[index][1] for index in family])):
            adjusted[index] = value
    return adjusted


@dataclass(frozen=True)
class Ranking:
    """The best arm overall, named only when it is significantly more accurate than each other arm."""

    best: str | None
    reason: str
    tests: tuple[Versus, ...] = ()  # the top arm against each other arm, overall

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "reason": self.reason, "tests": [versus.to_dict() for versus in self.tests]}


def rank_arms(arms: Sequence[Arm], paired: bool, also_tested: Sequence[Versus] = ()) -> Ranking:
    """The arm with the highest overall accuracy is the best only when it is significantly above every other arm.

    Its tests against the others are Holm-corrected together with the overall tests of `also_tested` (the
    comparisons with the baseline the report shows), so that a best arm is never contradicted by the baseline
    table. `paired`: whether every run has per-question outcomes."""
    if len(arms) < 2:
        return Ranking(None, "one projector only: nothing to rank")
    ordered = sorted(arms, key=lambda arm: -arm.overall.value)
    top = ordered[0]
    if ordered[1].overall.value == top.overall.value:
        tied = [arm.name for arm in ordered if arm.overall.value == top.overall.value]
        return Ranking(None, f"no best: {', '.join(tied)} tie on overall accuracy ({_percent(top.overall.value)})")
    if not paired:
        return Ranking(None, "no best: paired tests need per-question results from every run")
    tests = _corrected_with(
        [versus for other in ordered[1:] for versus in compare_arms([top], other, (OVERALL,))], also_tested
    )
    behind = [versus.reference for versus in tests if versus.verdict != HIGHER]
    if behind:
        return Ranking(
            None,
            f"no best: {top.name} has the highest overall accuracy ({_percent(top.overall.value)}) but is not "
            f"significantly more accurate than {', '.join(behind)}",
            tests,
        )
    seeds = ", in every seed" if any(len(versus.tests) > 1 for versus in tests) else ""
    return Ranking(
        top.name,
        f"{top.name} is significantly more accurate overall than every other projector (exact McNemar, "
        f"Holm-corrected together with the comparisons against the baseline{seeds})",
        tests,
    )


def _corrected_with(family: Sequence[Versus], others: Sequence[Versus]) -> tuple[Versus, ...]:
    """The family's overall tests Holm-corrected per seed together with the overall tests of `others` (a pair tested
    in both counts once: its p-value is the same either way round)."""
    pairs = {frozenset((versus.arm, versus.reference)) for versus in family}
    extra = [(test.seed, test.p_value) for versus in others for test in versus.tests
             if versus.level == OVERALL and frozenset((versus.arm, versus.reference)) not in pairs]  # fmt: skip
    flat = [(index, test) for index, versus in enumerate(family) for test in versus.tests]
    adjusted = _holm_per_family([(test.seed, test.p_value) for _, test in flat] + extra)
    corrected: dict[int, list[PairedTest]] = {index: [] for index in range(len(family))}
    for (index, test), value in zip(flat, adjusted):
        corrected[index].append(replace(test, p_adjusted=value, significant=value < SIGNIFICANCE))
    return tuple(
        replace(versus, tests=tuple(corrected[index]), verdict=verdict(corrected[index]))
        for index, versus in enumerate(family)
    )


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"
