"""What a comparison says about the two papers' claims, as measured: supported or contradicted only when the paired
test against the LLaVA-1.5 MLP baseline is significant, "no significant difference" otherwise.

- LLaVA-SP: its visual spatial tokens improve spatial understanding over the MLP at nearly the same cost: judged on
  the spatial group of questions, with the measured cost (visual tokens, projector parameters, latency) beside it.
- SAEP: a quarter of the visual tokens, from multi-layer features, keeps or improves accuracy over the MLP: judged
  overall, with the measured token count beside it. A non-significant difference does not show "keeps"; its
  interval says how much worse the run could be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .arms import BLIND, Arm
from .paired import HIGHER, INCONSISTENT, LOWER, NO_DIFFERENCE, Versus
from .runs import OVERALL

LLAVA_SP = ("LLaVA-SP", "spatial tokens improve spatial understanding over the LLaVA-1.5 MLP at nearly the same cost")
SAEP = ("SAEP", "a quarter of the visual tokens with multi-layer features keeps or improves accuracy vs the MLP")
SPATIAL = "spatial"


@dataclass(frozen=True)
class ClaimCheck:
    paper: str
    claim: str
    arm: str | None  # the run's arm that tests it; None when the comparison has none
    level: str  # the questions it is judged on: "spatial" or "overall"
    verdict: str | None  # the paired verdict; None when not assessed
    finding: str  # one sentence, as measured

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def check_claims(
    arms: Sequence[Arm], baseline: Arm | None, versus_baseline: Sequence[Versus], assessable: str | None
) -> list[ClaimCheck]:
    """One check per LLaVA-SP arm (projector llava_sp*) and per SAEP arm, or one "not measured" per paper.
    `assessable`: None, or why no paired test could be made (different questions, no per-question results)."""
    checks = []
    for (paper, claim), is_paper, level in (
        (LLAVA_SP, lambda arm: arm.projector.startswith("llava_sp"), SPATIAL),
        (SAEP, lambda arm: arm.projector.startswith("saep"), OVERALL),
    ):
        testing = [arm for arm in arms if is_paper(arm) and arm is not baseline and arm.role != BLIND]
        if not testing:
            checks.append(ClaimCheck(paper, claim, None, level, None, f"not measured: no {paper} run in this comparison"))
        for arm in testing:
            verdict, finding = _finding(arm, baseline, versus_baseline, level, assessable)
            cost = _cost(arm, baseline) if baseline is not None else ""
            checks.append(ClaimCheck(paper, claim, arm.name, level, verdict, finding + cost))
    return checks


def _finding(
    arm: Arm, baseline: Arm | None, versus_baseline: Sequence[Versus], level: str, assessable: str | None
) -> tuple[str | None, str]:
    if baseline is None:
        return None, "not assessed: no LLaVA-1.5 MLP baseline run"
    if assessable is not None:
        return None, f"not assessed: {assessable}"
    found = [v for v in versus_baseline if v.arm == arm.name and v.level == level]
    questions = "the spatial questions" if level == SPATIAL else "all questions"
    if not found:
        return None, f"not assessed: no paired results on {questions} (per-question results with groups are needed)"
    versus = found[0]
    seeds = f", {len(versus.tests)} seeds" if len(versus.tests) > 1 else ""
    measured = (
        f"{_points(versus.difference)} points against {baseline.name} on {questions} "
        f"(95% interval {_points(versus.interval.low)} to {_points(versus.interval.high)}{seeds})"
    )
    if versus.verdict == HIGHER:
        return versus.verdict, f"supported: {measured}, significantly higher after Holm correction"
    if versus.verdict == LOWER:
        return versus.verdict, f"contradicted: {measured}, significantly lower after Holm correction"
    if versus.verdict == INCONSISTENT:
        seeds = f"{versus.significant_seeds} of {len(versus.tests)} seeds"
        return versus.verdict, f"not shown: {measured}, significant in {seeds} only"
    assert versus.verdict == NO_DIFFERENCE
    if level == OVERALL:
        return versus.verdict, (
            f"no significant difference: {measured}; consistent with keeping accuracy, not proof of it "
            f"(the interval allows up to {_points(max(0.0, -versus.interval.low), signed=False)} points lower)"
        )
    return versus.verdict, f"no significant difference: {measured}"


def _cost(arm: Arm, baseline: Arm) -> str:
    tokens, base_tokens = arm.visual_tokens, baseline.visual_tokens
    parts = [f"{tokens} visual tokens vs {base_tokens} ({tokens / base_tokens:.2f}x)"]
    params, base_params = arm.mean("projector_parameters"), baseline.mean("projector_parameters")
    if params is not None and base_params:
        parts.append(f"projector parameters {params / base_params:.1f}x")
    latency, base_latency = arm.mean("latency_ms_per_sample"), baseline.mean("latency_ms_per_sample")
    if latency is not None and base_latency:
        parts.append(f"latency {latency / base_latency:.2f}x")
    return ". Cost: " + ", ".join(parts) + "."


def _points(fraction: float, signed: bool = True) -> str:
    return f"{fraction * 100:+.1f}" if signed else f"{fraction * 100:.1f}"
