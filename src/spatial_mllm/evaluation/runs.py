"""One evaluated run as the comparison reads it: its facts, how many questions each accuracy is over, and (scores
version 2) whether each question was answered right, so that two runs can be compared question by question.

A run is a dict, e.g. a scores file of `spatial-mllm eval` (`score_answers(...)` merged with the run's facts):
  name (str, unique), projector (str), visual_tokens (int), overall (accuracy), categories ({name: accuracy});
  counts ({"overall": {"correct", "total"}, "categories": {...}, "groups"?: {...}, "types"?: {...}}) or, for
  POPE, pope (its splits' tp/tn/total): the intervals need them;
  optional: per_question ([{"question_id", "category", "group"?, "region"?, "type"?, "correct"}]: paired tests
  and regions need it; type: the question's format, as the answer key gives it), projector_parameters (int),
  latency_ms_per_sample, tokens_per_second, image_reliance
  (`ImageReliance.to_dict()`), benchmark, questions_file, questions_sha256 (which runs compare), control ("blind":
  the same recipe with every sample's image replaced by another's), arm (runs of one arm are seeds of one recipe;
  default: the name) and seed (int).
Accuracies are fractions in [0, 1]. Other keys are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .records import Tally, read_optional_tallies, read_tallies, read_tally, require_field, require_text

CONTROLS = ("blind",)
OVERALL = "overall"
# What the accuracies of a run are broken down by; "overall" holds one entry, also named "overall".
KINDS = ("overall", "categories", "groups", "regions", "types")


@dataclass(frozen=True)
class QuestionOutcome:
    question_id: str
    category: str
    group: str
    region: str | None
    correct: bool
    type: str | None = None  # the question's format: "short", "mc" (multiple choice), "yesno"


@dataclass(frozen=True)
class RunSummary:
    name: str
    projector: str
    visual_tokens: int
    overall: float
    categories: dict[str, float]
    projector_parameters: int | None = None
    latency_ms_per_sample: float | None = None
    tokens_per_second: float | None = None
    image_gain: float | None = None  # nats per supervised token the model gains from its own image (image_reliance)
    image_gain_se: float | None = None
    arm: str = ""
    seed: int | None = None
    control: str | None = None
    benchmark: str | None = None
    questions_file: str | None = None
    questions_sha256: str | None = None
    tallies: dict[str, dict[str, Tally]] = field(default_factory=dict)  # kind (KINDS) -> name -> right of total
    outcomes: tuple[QuestionOutcome, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run's facts and counts for report.json; per-question outcomes are left in the scores file."""
        facts = {key: value for key, value in asdict(self).items() if key not in ("tallies", "outcomes")}
        facts["counts"] = {
            kind: {name: tally.to_dict() for name, tally in tallies.items()} for kind, tallies in self.tallies.items()
        }
        facts["per_question"] = self.outcomes is not None
        return facts


def read_run(result: Mapping[str, Any], where: str) -> RunSummary:
    """Check one run's dict and keep what the comparison uses; errors name `where` and the field."""
    if not isinstance(result, Mapping):
        raise ValueError(f"{where}: expected a JSON object of scores and run facts, got {type(result).__name__}")
    categories = require_field(result, "categories", where)
    if not isinstance(categories, Mapping) or not categories:
        raise ValueError(f"{where}: field 'categories' must be a non-empty object of category -> accuracy")
    name = require_text(result, "name", where)
    overall = _accuracy(require_field(result, "overall", where), f"{where}, field 'overall'")
    accuracies = {
        str(category): _accuracy(value, f"{where}, category {category!r}") for category, value in categories.items()
    }
    outcomes = _read_outcomes(result.get("per_question"), where)
    tallies = _tallies(result, outcomes, where)
    _check_agreement(result, overall, accuracies, tallies, "per_question" if outcomes else "counts", where)
    return RunSummary(
        name=name,
        projector=require_text(result, "projector", where),
        visual_tokens=_count(result, "visual_tokens", where, minimum=1),
        overall=overall,
        categories=accuracies,
        projector_parameters=(
            _count(result, "projector_parameters", where, minimum=0)
            if result.get("projector_parameters") is not None
            else None
        ),
        latency_ms_per_sample=_optional_positive(result, "latency_ms_per_sample", where),
        tokens_per_second=_optional_positive(result, "tokens_per_second", where),
        **_image_gain(result, where),
        arm=_optional_text(result, "arm", where) or name,
        seed=_optional_seed(result, where),
        control=_control(result, where),
        benchmark=_optional_text(result, "benchmark", where),
        questions_file=_optional_text(result, "questions_file", where),
        questions_sha256=_optional_text(result, "questions_sha256", where),
        tallies=tallies,
        outcomes=outcomes,
    )


def read_scores_file(path: str | Path) -> dict[str, Any]:
    """A scores JSON of `spatial-mllm eval`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scores file")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object of scores and run facts, got {type(result).__name__}")
    if "answers_file" in result and "benchmark" not in result:
        raise ValueError(
            f"{path}: answers without scores (eval ran without --answer-key or --pope); run eval again with one"
        )
    return result


def tally_outcomes(outcomes: Iterable[QuestionOutcome]) -> dict[str, dict[str, Tally]]:
    """Right answers of total per kind of breakdown: overall, category, group, region and format (questions that
    have one)."""
    counts: dict[str, dict[str, list[int]]] = {kind: {} for kind in KINDS}
    for outcome in outcomes:
        names = (OVERALL, outcome.category, outcome.group, outcome.region, outcome.type)
        for kind, name in zip(KINDS, names):
            if name is not None:
                tally = counts[kind].setdefault(name, [0, 0])
                tally[0] += outcome.correct
                tally[1] += 1
    return {kind: {name: Tally(*tally) for name, tally in found.items()} for kind, found in counts.items()}


def _read_outcomes(rows: Any, where: str) -> tuple[QuestionOutcome, ...] | None:
    if rows is None or rows == []:
        return None
    if not isinstance(rows, list):
        raise ValueError(f"{where}: field 'per_question' must be a list of per-question results")
    outcomes, seen = [], set()
    for index, row in enumerate(rows):
        here = f"{where}, per_question row {index}"
        question_id = str(require_field(row, "question_id", here))
        if question_id in seen:
            raise ValueError(f"{here}: question_id {question_id!r} appears twice")
        seen.add(question_id)
        category = require_text(row, "category", here)
        correct = require_field(row, "correct", here)
        if correct not in (True, False):  # 0 and 1 included
            raise ValueError(f"{here}: field 'correct' must be true/false or 1/0, got {correct!r}")
        group = require_text(row, "group", here) if row.get("group") is not None else category
        region = require_text(row, "region", here) if row.get("region") is not None else None
        question_type = require_text(row, "type", here) if row.get("type") is not None else None
        outcomes.append(QuestionOutcome(question_id, category, group, region, bool(correct), question_type))
    return tuple(outcomes)


def _tallies(result: Mapping[str, Any], outcomes, where: str) -> dict[str, dict[str, Tally]]:
    if outcomes is not None:
        return tally_outcomes(outcomes)
    empty = {kind: {} for kind in KINDS}
    counts = result.get("counts")
    if counts is not None:
        if not isinstance(counts, Mapping):
            raise ValueError(f"{where}: field 'counts' must be an object with 'overall' and 'categories'")
        overall = read_tally(require_field(counts, OVERALL, f"{where}, counts"), f"{where}, counts 'overall'")
        return empty | read_optional_tallies(counts, f"{where}, counts") | {
            OVERALL: {OVERALL: overall},
            "categories": read_tallies(require_field(counts, "categories", f"{where}, counts"), f"{where}, counts"),
        }
    pope = result.get("pope")
    if isinstance(pope, Mapping) and isinstance(pope.get("splits"), Mapping):
        splits = {}
        for split, metrics in pope["splits"].items():
            here = f"{where}, pope split {split!r}"
            right = require_field(metrics, "tp", here) + require_field(metrics, "tn", here)
            splits[str(split)] = read_tally({"correct": right, "total": require_field(metrics, "total", here)}, here)
        overall = Tally(sum(t.correct for t in splits.values()), sum(t.total for t in splits.values()))
        return empty | {OVERALL: {OVERALL: overall}, "categories": splits}
    raise ValueError(
        f"{where}: missing field 'counts' (right answers and questions per category), which intervals need; "
        "the scores files of spatial-mllm eval carry it"
    )


def _check_agreement(result, overall: float, categories: dict[str, float], tallies, source: str, where: str) -> None:
    """The accuracies given must be the counts' (a mismatch means an edited or mixed-up file)."""
    stated = dict(categories)
    if "pope" not in result:  # POPE's overall is the mean over splits, not over questions
        stated[OVERALL] = overall
    counted = tallies["categories"] | {OVERALL: tallies[OVERALL][OVERALL]}
    for name, accuracy in stated.items():
        tally = counted.get(name)
        if tally is None:
            raise ValueError(f"{where}: category {name!r} has an accuracy but no count in field {source!r}")
        if abs(tally.accuracy - accuracy) > 1e-9:
            label = "field 'overall'" if name == OVERALL else f"category {name!r}"
            raise ValueError(
                f"{where}: {label} is {accuracy!r} but field {source!r} has {tally.correct} of {tally.total} right"
            )


def _image_gain(result: Mapping[str, Any], where: str) -> dict[str, float]:
    reliance = result.get("image_reliance")
    if reliance is None:
        return {}
    if not isinstance(reliance, Mapping):
        raise ValueError(f"{where}: field 'image_reliance' must be an object (ImageReliance.to_dict()), got {reliance!r}")
    gain, error = reliance.get("gap"), reliance.get("gap_standard_error")
    if not _is_number(gain) or not _is_number(error) or error < 0:
        raise ValueError(
            f"{where}: field 'image_reliance' needs numbers 'gap' and 'gap_standard_error' >= 0, got {gain!r}, {error!r}"
        )
    return {"image_gain": float(gain), "image_gain_se": float(error)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _accuracy(value: Any, where: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{where}: accuracy must be a number, got {value!r}")
    if not 0 <= value <= 1:
        hint = " (accuracies are fractions; divide percentages by 100)" if 1 < value <= 100 else ""
        raise ValueError(f"{where}: accuracy must lie in [0, 1], got {value!r}{hint}")
    return float(value)


def _count(result: Mapping[str, Any], field_name: str, where: str, minimum: int) -> int:
    value = require_field(result, field_name, where)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: field {field_name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_positive(result: Mapping[str, Any], field_name: str, where: str) -> float | None:
    value = result.get(field_name)
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{where}: field {field_name!r} must be a positive number, got {value!r}")
    return float(value)


def _optional_text(result: Mapping[str, Any], field_name: str, where: str) -> str | None:
    return require_text(result, field_name, where) if result.get(field_name) is not None else None


def _optional_seed(result: Mapping[str, Any], where: str) -> int | None:
    seed = result.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{where}: field 'seed' must be an integer, got {seed!r}")
    return seed


def _control(result: Mapping[str, Any], where: str) -> str | None:
    control = result.get("control")
    if control is not None and control not in CONTROLS:
        raise ValueError(f"{where}: field 'control' must be one of {', '.join(CONTROLS)} (or absent), got {control!r}")
    return control
