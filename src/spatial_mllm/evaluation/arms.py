"""Arms: the runs of one recipe (one per seed) grouped, with accuracies and their 95% intervals by overall,
category, group, image region and question format. One run: its accuracy with the Wilson interval. Several seeds:
the mean across seeds with the Student t interval of the mean, the standard deviation and each seed's accuracy
beside it.

Runs sharing an `arm` are seeds of one recipe and need distinct seeds. The baseline is the arm named as asked, or
the one arm with that projector (`mlp2x_gelu` by default); runs marked `"control": "blind"` form the blind control.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .records import Tally
from .runs import KINDS, OVERALL, RunSummary
from .statistics import Interval, seed_spread, wilson_interval

DEFAULT_BASELINE = "mlp2x_gelu"
BASELINE, PROJECTOR, BLIND = "baseline", "projector", "blind control"
GRID_ROWS, GRID_COLUMNS = {"top": 0, "bottom": 2}, {"left": 0, "right": 2}


@dataclass(frozen=True)
class Estimate:
    """An accuracy with its 95% interval. One run: its accuracy, counts and Wilson interval. Several seeds: the
    mean, the standard deviation and t interval across seeds, and each seed's accuracy."""

    value: float
    interval: Interval
    correct: int | None = None
    total: int | None = None  # questions (per seed, when every seed has the same number)
    sd: float | None = None
    per_seed: tuple[float, ...] = ()

    @property
    def seeds(self) -> int:
        return max(1, len(self.per_seed))

    def to_dict(self) -> dict[str, Any]:
        found = {"value": self.value, "low": self.interval.low, "high": self.interval.high}
        if self.per_seed:
            return found | {"sd": self.sd, "per_seed": list(self.per_seed), "questions_per_seed": self.total}
        return found | {"correct": self.correct, "total": self.total}


def estimate(tallies: Sequence[Tally]) -> Estimate:
    """The accuracy of one tally per seed (one tally for a single run)."""
    if len(tallies) == 1:
        (tally,) = tallies
        return Estimate(tally.accuracy, wilson_interval(tally.correct, tally.total), tally.correct, tally.total)
    spread = seed_spread([tally.accuracy for tally in tallies])
    totals = {tally.total for tally in tallies}
    interval = Interval(max(0.0, spread.interval.low), min(1.0, spread.interval.high))
    return Estimate(spread.mean, interval, None, totals.pop() if len(totals) == 1 else None, spread.sd,
                    tuple(tally.accuracy for tally in tallies))  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One recipe: its runs (one per seed, by seed) and its accuracies by kind (runs.KINDS) and name."""

    name: str
    projector: str
    role: str  # BASELINE, PROJECTOR or BLIND
    runs: tuple[RunSummary, ...]
    accuracy: dict[str, dict[str, Estimate]]

    @property
    def overall(self) -> Estimate:
        return self.accuracy[OVERALL][OVERALL]

    @property
    def visual_tokens(self) -> int:
        return self.runs[0].visual_tokens

    @property
    def seeds(self) -> tuple[int | None, ...]:
        return tuple(run.seed for run in self.runs)

    def mean(self, fact: str) -> float | None:
        """A run fact (latency, tokens/s, image gain, parameters) averaged over the seeds that measured it."""
        values = [getattr(run, fact) for run in self.runs if getattr(run, fact) is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "projector": self.projector,
            "role": self.role,
            "visual_tokens": self.visual_tokens,
            "seeds": list(self.seeds),
            "accuracy": {kind: {name: e.to_dict() for name, e in found.items()} for kind, found in self.accuracy.items()},
            "runs": [run.to_dict() for run in self.runs],
        }


def group_arms(runs: Sequence[RunSummary], sources: Sequence[str], baseline: str | None = None) -> list[Arm]:
    """Runs grouped by arm in order of first appearance, each arm with its role and accuracies. `baseline`: an arm
    name or a projector (default mlp2x_gelu, which may then be absent or ambiguous: no baseline)."""
    grouped: dict[str, list[tuple[RunSummary, str]]] = {}
    for run, source in zip(runs, sources):
        grouped.setdefault(run.arm, []).append((run, source))
    blind = [name for name, members in grouped.items() if members[0][0].control == "blind"]
    if len(blind) > 1:
        raise ValueError(f"one blind control per comparison; these arms are blind controls: {', '.join(blind)}")
    base = _baseline_arm(grouped, baseline)
    arms = []
    for name, members in grouped.items():
        _check_arm(name, members)
        member_runs = sorted((run for run, _ in members), key=lambda run: (run.seed is None, run.seed or 0))
        role = BLIND if name in blind else BASELINE if name == base else PROJECTOR
        accuracy = {
            kind: {level: estimate([run.tallies[kind][level] for run in member_runs if level in run.tallies[kind]])
                   for level in ordered_names((level for run in member_runs for level in run.tallies[kind]), kind)}
            for kind in KINDS
        }  # fmt: skip
        arms.append(Arm(name, member_runs[0].projector, role, tuple(member_runs), accuracy))
    return arms


def ordered_names(names: Iterable[str], kind: str) -> tuple[str, ...]:
    """Names in the order first met (per-question rows follow the answer key, whose questions follow the world's
    category order); regions of the 3x3 grid row by row."""
    names = tuple(dict.fromkeys(names))
    if kind == "regions" and all(grid_cell(name) for name in names):
        return tuple(sorted(names, key=grid_cell))
    return names


def grid_cell(region: str) -> tuple[int, int] | None:
    """(row, column) of a 3x3 region named as the world names them ("top left", "top", "left", "center", "bottom
    right"); None for a name outside that scheme."""
    words = region.split()
    if words == ["center"]:
        return (1, 1)
    if len(words) == 1 and (words[0] in GRID_ROWS or words[0] in GRID_COLUMNS):
        return (GRID_ROWS.get(words[0], 1), GRID_COLUMNS.get(words[0], 1))
    if len(words) == 2 and words[0] in GRID_ROWS and words[1] in GRID_COLUMNS:
        return (GRID_ROWS[words[0]], GRID_COLUMNS[words[1]])
    return None


def _baseline_arm(grouped: dict[str, list[tuple[RunSummary, str]]], baseline: str | None) -> str | None:
    wanted = baseline or DEFAULT_BASELINE
    sighted = {name: members for name, members in grouped.items() if members[0][0].control is None}
    if wanted in sighted:
        return wanted
    matching = [name for name, members in sighted.items() if members[0][0].projector == wanted]
    if len(matching) > 1 and baseline is not None:
        raise ValueError(
            f"several runs use projector {wanted!r} ({', '.join(matching)}); name the baseline run (--baseline NAME)"
        )
    if len(matching) > 1:  # the default baseline is optional: without a name, none is chosen
        return None
    if not matching and baseline is not None:
        known = ", ".join(sorted({*sighted, *(members[0][0].projector for members in sighted.values())}))
        raise ValueError(f"baseline {baseline!r} is neither the name nor the projector of a run; runs: {known}")
    return matching[0] if matching else None


def _check_arm(name: str, members: list[tuple[RunSummary, str]]) -> None:
    """Runs of one arm must be seeds of one recipe."""
    first, first_source = members[0]
    seeds: dict[int | None, str] = {}
    for run, source in members:
        for fact in ("projector", "visual_tokens", "control"):
            if getattr(run, fact) != getattr(first, fact):
                raise ValueError(
                    f"{source}: arm {name!r} has {fact} {getattr(run, fact)!r} but {first_source} "
                    f"{getattr(first, fact)!r}; runs of one arm must be seeds of one recipe"
                )
        if len(members) > 1 and (run.seed is None or run.seed in seeds):
            other = f" as {seeds[run.seed]}" if run.seed in seeds else ""
            raise ValueError(
                f"{source}: arm {name!r} has several runs, so each needs its own 'seed'; got {run.seed!r}{other}"
            )
        seeds[run.seed] = source
