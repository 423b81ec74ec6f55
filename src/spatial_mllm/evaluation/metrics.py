"""Scoring the built-in spatial benchmark: grade each answer by its question type, then accuracy per category.

The answer-key schema is read in one place, `read_key_item`: records
{"question_id", "answer", "category", "type": "short" | "mc" | "yesno", "options"?: [...], "answer_letter"?: "B",
"group"?: the category group (default: the category), "region"?: the 3x3 region of the object asked about}.
The built-in world's keys (spatial_mllm.demo.world) are read too: they name the type "format" and, for "mc", hold
the letter in "answer" and the option text in "answer_text".
Answer records are LLaVA's answers JSONL: {"question_id", "text", ...}. Accuracies are fractions in [0, 1].

Scores format (`SCORES_VERSION`): 1 had per-question rows without group and region; 2 adds them, the accuracy per
group, and the "scores_version" field itself. Readers treat a file without the field as version 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .multiple_choice import OPTION_LETTERS, choice_question_parts, extract_choice_letter
from .pope import parse_yes_no
from .records import pair_with_answers, require_field, require_text
from .vqa import normalize_vqa_answer

ANSWER_TEXT_FIELD = "text"
SCORES_VERSION = 2


@dataclass(frozen=True)
class KeyItem:
    """One answer-key entry. For "mc", `answer` is the right letter and `options` the option texts. `group`: the
    category's group (the category itself when the key names none); `region`: where the object the question asks
    about lies (None when it asks about no single object)."""

    question_id: str
    category: str
    type: str
    answer: str
    options: tuple[str, ...] = ()
    group: str = ""
    region: str | None = None

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.category)


def read_key_item(record: Mapping[str, Any], where: str) -> KeyItem:
    """The one place that knows the answer-key schema; adapt here when the world generator's records change."""
    question_id = str(require_field(record, "question_id", where))
    category = require_text(record, "category", where)
    type_field = "format" if "type" not in record and "format" in record else "type"
    question_type = require_text(record, type_field, where)
    if question_type not in GRADERS:
        raise ValueError(f"{where}: field {type_field!r} must be one of {', '.join(GRADERS)}, got {question_type!r}")
    place = {
        "group": require_text(record, "group", where) if record.get("group") is not None else "",
        "region": require_text(record, "region", where) if record.get("region") is not None else None,
    }
    if question_type == "mc":
        answer_letter, options = _read_choice_key(record, where)
        return KeyItem(question_id, category, question_type, answer_letter, options, **place)
    answer = str(require_field(record, "answer", where))
    if question_type == "yesno" and answer.strip().lower() not in ("yes", "no"):
        raise ValueError(f"{where}: a yesno question needs answer 'yes' or 'no', got {answer!r}")
    return KeyItem(question_id, category, question_type, answer, **place)


def _read_choice_key(record: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...]]:
    # The right option may be given by letter, by text, or both (then they must agree). The world's keys hold the
    # letter in "answer" and the text in "answer_text"; other keys the letter in "answer_letter", the text in "answer".
    world_layout = record.get("answer_letter") is None and "answer_text" in record
    if world_layout:
        answer = record["answer_text"]
        record = {**record, "answer_letter": require_field(record, "answer", where)}
    else:
        answer = record.get("answer")
    options = record.get("options")
    if record.get("answer_letter") is None and isinstance(options, list) and answer in options:
        record = {**record, "answer_letter": OPTION_LETTERS[options.index(answer)]}
    options, answer_letter = choice_question_parts(record, where)
    if world_layout and answer not in options:
        raise ValueError(f"{where}: answer_text {answer!r} is not one of the options {options!r}")
    if answer in options and options[OPTION_LETTERS.index(answer_letter)] != answer:
        raise ValueError(
            f"{where}: answer {answer!r} disagrees with answer_letter {answer_letter!r} "
            f"(option {answer_letter} is {options[OPTION_LETTERS.index(answer_letter)]!r})"
        )
    return answer_letter, tuple(options)


def _grade_short(item: KeyItem, response: str) -> tuple[str, bool]:
    # VQA normalisation rather than GQA's: counting answers must match "two" with "2".
    parsed = normalize_vqa_answer(response)
    return parsed, parsed == normalize_vqa_answer(item.answer)


def _grade_choice(item: KeyItem, response: str) -> tuple[str | None, bool]:
    parsed = extract_choice_letter(response, item.options)
    return parsed, parsed == item.answer


def _grade_yes_no(item: KeyItem, response: str) -> tuple[str, bool]:
    parsed = parse_yes_no(response)
    return parsed, parsed == item.answer.strip().lower()


# question type -> grader(key item, model text) -> (what the answer was read as, whether it is right)
GRADERS: dict[str, Callable[[KeyItem, str], tuple[str | None, bool]]] = {
    "short": _grade_short,
    "mc": _grade_choice,
    "yesno": _grade_yes_no,
}


def accuracy_by_group(graded: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """(group, correct) pairs -> {"overall": acc, "groups": {group: acc}, "counts": {...correct/total...}}.

    Groups appear sorted by name. Overall is over questions (micro average), not the mean of group accuracies.
    """
    counts: dict[str, list[int]] = {}
    for group, correct in graded:
        tally = counts.setdefault(group, [0, 0])
        tally[0] += bool(correct)
        tally[1] += 1
    if not counts:
        raise ValueError("no graded answers to score")
    correct_total = sum(tally[0] for tally in counts.values())
    total = sum(tally[1] for tally in counts.values())
    names = sorted(counts)
    return {
        "overall": correct_total / total,
        "groups": {name: counts[name][0] / counts[name][1] for name in names},
        "counts": {
            "overall": {"correct": correct_total, "total": total},
            "groups": {name: {"correct": counts[name][0], "total": counts[name][1]} for name in names},
        },
    }


def score_answers(
    answers: list[Mapping[str, Any]],
    answer_key: list[Mapping[str, Any]],
    answers_source: str = "answers",
    key_source: str = "answer key",
) -> dict[str, Any]:
    """Score the built-in benchmark: every key question needs one answer, and every answer a key question.

    Returns {"scores_version": 2, "overall": acc, "categories": {category: acc}, "groups": {group: acc},
    "types": {type: acc}, "counts": {"overall": {"correct", "total"}, "categories": {...}, "groups": {...},
    "types": {...}}, "per_question": [{"question_id", "category", "group", "region", "type", "response", "parsed",
    "correct"}]}, per-question rows in answer-key order, so that two runs can be compared question by question.
    The `*_source` names (file paths, say) appear in error messages.
    """
    per_question = []
    for index, record, answer in pair_with_answers(answer_key, answers, key_source, answers_source):
        item = read_key_item(record, f"{key_source} record {index}")
        where = f"{answers_source}, answer to question_id {item.question_id!r}"
        response = require_text(answer, ANSWER_TEXT_FIELD, where)
        parsed, correct = GRADERS[item.type](item, response)
        per_question.append(
            {
                "question_id": item.question_id,
                "category": item.category,
                "group": item.group,
                "region": item.region,
                "type": item.type,
                "response": response,
                "parsed": parsed,
                "correct": correct,
            }
        )
    if not per_question:
        raise ValueError(f"{key_source}: no questions")
    by_category = accuracy_by_group((row["category"], row["correct"]) for row in per_question)
    by_group = accuracy_by_group((row["group"], row["correct"]) for row in per_question)
    by_type = accuracy_by_group((row["type"], row["correct"]) for row in per_question)
    return {
        "scores_version": SCORES_VERSION,
        "overall": by_category["overall"],
        "categories": by_category["groups"],
        "groups": by_group["groups"],
        "types": by_type["groups"],
        "counts": {
            "overall": by_category["counts"]["overall"],
            "categories": by_category["counts"]["groups"],
            "groups": by_group["counts"]["groups"],
            "types": by_type["counts"]["groups"],
        },
        "per_question": per_question,
    }
