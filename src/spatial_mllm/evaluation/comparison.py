"""Comparing evaluated runs honestly: accuracies with 95% intervals, each projector against the baseline and against
the blind control question by question, "significant" only after Holm's correction, a best projector named only
when it is significantly better than every other, accuracy by the image region of the object asked about, the
spread across seeds, and what the comparison says about the LLaVA-SP and SAEP claims.

`compare_runs(runs, ...) -> Comparison` returns numbers; `report.write_report` writes them as Markdown, JSON and
figures. Runs are dicts as runs.py describes (the scores files of `spatial-mllm eval`); arms.py says how runs form
arms (seeds, baseline, blind control), paired.py how arms are compared, claims.py how the papers' claims are read.
Runs of different benchmarks are refused. Runs scored on different questions (another question file, or another
subset of it because eval skipped lines) are refused unless `allow_mixed_questions`: then the counts are shown and
no ranking, paired test or claim is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .arms import BASELINE, BLIND, DEFAULT_BASELINE, PROJECTOR, Arm, Estimate, estimate, group_arms, ordered_names
from .claims import ClaimCheck, check_claims
from .paired import Ranking, Versus, compare_arms, rank_arms
from .records import describe_ids
from .runs import OVERALL, RunSummary, read_run
from .statistics import CONFIDENCE, SIGNIFICANCE
from .text_ceiling import TextCeiling


@dataclass(frozen=True)
class Comparison:
    benchmark: str | None
    same_questions: bool
    arms: tuple[Arm, ...]
    categories: tuple[str, ...]
    groups: tuple[str, ...]
    regions: tuple[str, ...]
    types: tuple[str, ...]  # question formats (short answer, multiple choice)
    baseline: str | None  # arm names
    blind: str | None
    text_ceiling: TextCeiling | None
    ceiling_accuracy: dict[str, dict[str, Estimate]]  # kind -> name -> estimate
    versus_baseline: tuple[Versus, ...]
    versus_blind: tuple[Versus, ...]
    ranking: Ranking
    claims: tuple[ClaimCheck, ...]
    notes: tuple[str, ...]
    unpaired: str | None = None  # why no paired test could be made (different questions, no per-question results)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"no arm named {name!r}; arms: {', '.join(arm.name for arm in self.arms)}")

    def versus(self, arm: str, level: str = OVERALL, reference: str | None = None) -> Versus:
        """`arm` against the baseline (or against `reference`, e.g. comparison.blind) on `level`."""
        reference = reference or self.baseline
        for found in (*self.versus_baseline, *self.versus_blind):
            if (found.arm, found.level, found.reference) == (arm, level, reference):
                return found
        raise KeyError(f"no paired comparison of {arm!r} with {reference!r} on {level!r}")

    @property
    def seeded(self) -> bool:
        return any(len(arm.runs) > 1 for arm in self.arms)

    def to_dict(self) -> dict[str, Any]:
        ceiling = None
        if self.text_ceiling is not None:
            accuracy = self.ceiling_accuracy.items()
            ceiling = self.text_ceiling.to_dict() | {
                "accuracy": {kind: {name: e.to_dict() for name, e in found.items()} for kind, found in accuracy}
            }
        return {
            "accuracy_unit": "fraction",
            "confidence": CONFIDENCE,
            "significance": SIGNIFICANCE,
            "methods": {
                "accuracy_interval": "Wilson score (one run); Student t interval of the mean across seeds",
                "paired_test": "exact McNemar (two-sided binomial test of the discordant questions), Holm-corrected",
                "difference_interval": "Newcombe hybrid score, paired (one seed); t interval across seeds",
            },
            "benchmark": self.benchmark,
            "same_questions": self.same_questions,
            "categories": list(self.categories),
            "groups": list(self.groups),
            "regions": list(self.regions),
            "types": list(self.types),
            "baseline": self.baseline,
            "blind_control": self.blind,
            "text_ceiling": ceiling,
            "best_overall": self.ranking.best,
            "ranking": self.ranking.to_dict(),
            "arms": [arm.to_dict() for arm in self.arms],
            "versus_baseline": [versus.to_dict() for versus in self.versus_baseline],
            "versus_blind": [versus.to_dict() for versus in self.versus_blind],
            "claims": [claim.to_dict() for claim in self.claims],
            "notes": list(self.notes),
            "paired_tests_withheld": self.unpaired,
        }


def compare_runs(
    runs: Sequence[Mapping[str, Any]],
    *,
    sources: Sequence[str] | None = None,
    baseline: str | None = None,
    text_ceiling: TextCeiling | Mapping[str, Any] | None = None,
    allow_mixed_questions: bool = False,
) -> Comparison:
    """Compare evaluated runs (dicts as runs.py describes).

    sources: what to call each run in errors (file paths, say; default "result N"). baseline: an arm name or a
    projector (default mlp2x_gelu, which may then be absent). text_ceiling: a TextCeiling or its dict.
    allow_mixed_questions: show runs scored on different questions (counts, no ranking or paired tests).
    """
    if not runs:
        raise ValueError("no evaluation results to compare")
    sources = [f"result {index}" for index in range(len(runs))] if sources is None else list(sources)
    if len(sources) != len(runs):
        raise ValueError(f"{len(sources)} sources for {len(runs)} runs")
    summaries = [read_run(run, source) for run, source in zip(runs, sources)]
    _check_names(summaries, sources)
    ceiling = TextCeiling.from_dict(text_ceiling) if isinstance(text_ceiling, Mapping) else text_ceiling
    mixed = _question_mismatches(summaries, sources, ceiling)
    if mixed and not allow_mixed_questions:
        raise ValueError(
            f"{mixed[0]}; compare runs scored on the same questions (or allow mixed questions, --mixed-questions: "
            "counts shown, no ranking or paired tests)"
        )
    arms = group_arms(summaries, sources, baseline)
    base = next((arm for arm in arms if arm.role == BASELINE), None)
    blind = next((arm for arm in arms if arm.role == BLIND), None)
    sighted = [arm for arm in arms if arm.role != BLIND]
    notes = [f"not the same questions: {problem}" for problem in mixed]
    without_outcomes = [run.name for run in summaries if run.outcomes is None]
    unpaired = None
    if mixed:
        unpaired = "the runs were not scored on the same questions"
    elif without_outcomes:
        unpaired = f"no per-question results (field 'per_question') in {', '.join(without_outcomes)}"
        notes.append(f"{unpaired}: paired tests and the best projector are withheld")
    if base is None:
        wanted = baseline or DEFAULT_BASELINE
        candidates = [arm.name for arm in sighted if arm.projector == wanted]
        found = f"several runs use {wanted} ({', '.join(candidates)}); name one as the baseline" if candidates else (
            f"no baseline ({wanted}) among the runs"
        )  # fmt: skip
        notes.append(f"{found}: no comparisons with a baseline")
    levels = (OVERALL, *_levels(arms, "groups"))
    projectors = [arm for arm in arms if arm.role == PROJECTOR]
    versus_baseline = compare_arms(projectors, base, levels) if base and not unpaired else []
    versus_blind = compare_arms(sighted, blind, levels) if blind and not unpaired else []
    if mixed:
        ranking = Ranking(None, "no ranking: the runs were not scored on the same questions")
    else:
        ranking = rank_arms(sighted, paired=not without_outcomes, also_tested=versus_baseline)
    return Comparison(
        benchmark=summaries[0].benchmark,
        same_questions=not mixed,
        arms=tuple(arms),
        categories=_levels(arms, "categories"),
        groups=_levels(arms, "groups"),
        regions=_levels(arms, "regions"),
        types=_levels(arms, "types"),
        baseline=base.name if base else None,
        blind=blind.name if blind else None,
        text_ceiling=ceiling,
        ceiling_accuracy=_ceiling_accuracy(ceiling),
        versus_baseline=tuple(versus_baseline),
        versus_blind=tuple(versus_blind),
        ranking=ranking,
        claims=tuple(check_claims(arms, base, versus_baseline, unpaired)),
        notes=tuple(notes),
        unpaired=unpaired,
    )


def _check_names(runs: list[RunSummary], sources: list[str]) -> None:
    first_source: dict[str, str] = {}
    for run, source in zip(runs, sources):
        if run.name in first_source:
            raise ValueError(
                f"{source}: run name {run.name!r} is also the name in {first_source[run.name]}; names must differ "
                "(give each run its own with spatial-mllm eval --name)"
            )
        first_source[run.name] = source


def _question_mismatches(runs: list[RunSummary], sources: list[str], ceiling: TextCeiling | None) -> list[str]:
    """Why the runs were not scored on the same questions (empty when they were); other benchmarks are refused."""
    first, first_source = runs[0], sources[0]
    problems = []
    for run, source in zip(runs[1:], sources[1:]):
        if run.benchmark != first.benchmark:
            raise ValueError(
                f"{source} is scored as {run.benchmark!r} but {first_source} as {first.benchmark!r}; "
                "report runs of one benchmark together"
            )
        digests = (run.questions_sha256, first.questions_sha256)
        if None not in digests and digests[0] != digests[1]:
            problems.append(
                f"{source} answered {run.questions_file} but {first_source} answered {first.questions_file}, "
                "a different question file"
            )
        elif run.outcomes is not None and first.outcomes is not None:
            ids, first_ids = {o.question_id for o in run.outcomes}, {o.question_id for o in first.outcomes}
            if ids != first_ids:
                holder, only = (source, ids - first_ids) if ids - first_ids else (first_source, first_ids - ids)
                problems.append(
                    f"{source} was scored on {len(ids)} questions and {first_source} on {len(first_ids)}, not the same "
                    f"ones (only {holder} has {describe_ids(sorted(only))})"
                )
        elif _totals(run) != _totals(first):
            problems.append(
                f"{source} was scored on {_totals(run)} questions per category and {first_source} on {_totals(first)}"
            )
    if ceiling is not None and None not in (ceiling.questions_sha256, first.questions_sha256):
        if ceiling.questions_sha256 != first.questions_sha256:
            problems.append(
                f"the text ceiling ({ceiling.model}) was measured on another question file than {first_source}"
            )
    return problems


def _totals(run: RunSummary) -> dict[str, int]:
    return {name: tally.total for name, tally in run.tallies["categories"].items()}


def _levels(arms: Sequence[Arm], kind: str) -> tuple[str, ...]:
    return ordered_names((level for arm in arms for level in arm.accuracy[kind]), kind)


def _ceiling_accuracy(ceiling: TextCeiling | None) -> dict[str, dict[str, Estimate]]:
    if ceiling is None:
        return {}
    return {
        OVERALL: {OVERALL: estimate([ceiling.overall])},
        "categories": {name: estimate([tally]) for name, tally in ceiling.categories.items()},
        "groups": {name: estimate([tally]) for name, tally in ceiling.groups.items()},
        "types": {name: estimate([tally]) for name, tally in ceiling.types.items()},
    }
