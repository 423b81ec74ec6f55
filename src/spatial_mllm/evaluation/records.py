"""Reading evaluation records (JSONL) and pulling fields out of them (counts of right answers included) with errors
that name the place."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple


class JsonlLine(NamedTuple):
    number: int  # 1-based line number in the file
    record: dict[str, Any] | None  # None where the line is broken
    problem: str | None  # why the line is broken: not valid JSON, or not a JSON object


def jsonl_lines(path: str | Path) -> Iterator[JsonlLine]:
    """Each non-blank line of a JSONL file, parsed; a broken line comes with its problem instead of raising, so a
    caller can skip and report it (the evaluation runner) or stop at it (read_jsonl)."""
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield JsonlLine(number, None, f"not UTF-8 text ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield JsonlLine(number, None, f"not valid JSON ({err.msg})")
                continue
            if isinstance(record, dict):
                yield JsonlLine(number, record, None)
            else:
                yield JsonlLine(number, None, f"expected a JSON object, got {type(record).__name__}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped. Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records: list[dict[str, Any]] = []
    for line in jsonl_lines(path):
        if line.problem is not None:
            raise ValueError(f"{path}, line {line.number}: {line.problem}")
        records.append(line.record)
    return records


def require_field(record: Any, field: str, where: str) -> Any:
    """`record[field]`, or a ValueError naming `where` (e.g. "answers record 3") and the missing field."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object with field {field!r}, got {type(record).__name__}")
    if field not in record or record[field] is None:
        raise ValueError(f"{where}: missing field {field!r}")
    return record[field]


def require_text(record: Any, field: str, where: str) -> str:
    """A field that must hold a string (model outputs, labels, categories)."""
    value = require_field(record, field, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def index_by_question_id(records: list[Mapping[str, Any]], source: str) -> dict[str, Mapping[str, Any]]:
    """Records keyed by str(question_id) (ids may be ints in one file and strings in another); duplicates are errors."""
    indexed: dict[str, Mapping[str, Any]] = {}
    for index, record in enumerate(records):
        question_id = str(require_field(record, "question_id", f"{source} record {index}"))
        if question_id in indexed:
            raise ValueError(f"{source} record {index}: question_id {question_id!r} appears twice")
        indexed[question_id] = record
    return indexed


def describe_ids(ids: list[str], limit: int = 5) -> str:
    """A short list for error messages: the first few ids, then how many more."""
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"{shown} and {len(ids) - limit} more" if len(ids) > limit else shown


def pair_with_answers(
    questions: list[Mapping[str, Any]], answers: list[Mapping[str, Any]], questions_source: str, answers_source: str
) -> list[tuple[int, Mapping[str, Any], Mapping[str, Any]]]:
    """(question index, question, answer) in question order, matched on question_id.

    Every question needs exactly one answer and every answer a question: a mismatch means the wrong pair of
    files (or an interrupted run), which would otherwise give a score that looks plausible and is not.
    """
    answers_by_id = index_by_question_id(answers, answers_source)
    questions_by_id = index_by_question_id(questions, questions_source)
    unanswered = [question_id for question_id in questions_by_id if question_id not in answers_by_id]
    if unanswered:
        raise ValueError(
            f"{answers_source}: no answer for {len(unanswered)} questions of {questions_source}: "
            f"{describe_ids(unanswered)}"
        )
    unknown = [question_id for question_id in answers_by_id if question_id not in questions_by_id]
    if unknown:
        raise ValueError(
            f"{answers_source}: {len(unknown)} answers whose question_id is not in {questions_source}: "
            f"{describe_ids(unknown)}"
        )
    return [
        (index, question, answers_by_id[question_id])
        for index, (question_id, question) in enumerate(questions_by_id.items())
    ]


@dataclass(frozen=True)
class Tally:
    """k right answers among n questions."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def to_dict(self) -> dict[str, int]:
        return {"correct": self.correct, "total": self.total}


def read_tally(value: Any, where: str) -> Tally:
    """{"correct": k, "total": n} with 0 <= k <= n and n >= 1."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected {{'correct': k, 'total': n}}, got {value!r}")
    numbers = [value.get(key) for key in ("correct", "total")]
    if not all(isinstance(number, int) and not isinstance(number, bool) for number in numbers):
        raise ValueError(f"{where}: 'correct' and 'total' must be integers, got {numbers[0]!r} and {numbers[1]!r}")
    correct, total = numbers
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"{where}: need 0 <= correct <= total and total >= 1, got {correct} of {total}")
    return Tally(correct, total)


def read_tallies(value: Any, where: str) -> dict[str, Tally]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{where}: expected a non-empty object of name -> {{'correct', 'total'}}, got {value!r}")
    return {str(name): read_tally(tally, f"{where}, {name!r}") for name, tally in value.items()}


# Breakdowns a scores file's or text ceiling's `counts` may carry beside overall and categories.
OPTIONAL_BREAKDOWNS = ("groups", "types")


def read_optional_tallies(counts: Mapping[str, Any], where: str) -> dict[str, dict[str, Tally]]:
    """The optional breakdowns (`OPTIONAL_BREAKDOWNS`) that `counts` holds, each read as `read_tallies`."""
    return {kind: read_tallies(counts[kind], f"{where} {kind!r}") for kind in OPTIONAL_BREAKDOWNS
            if counts.get(kind) is not None}
