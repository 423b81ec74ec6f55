"""MME: per-subtask acc and acc+ and the summed score.

Every MME image comes with two yes/no questions (one true, one false). Per subtask, acc is the fraction of
questions answered right, acc+ the fraction of images whose questions are all right, and the subtask score is
(acc + acc+) * 100, so at most 200; the perception score (1510.7 for LLaVA-1.5-7B) sums the ten perception
subtasks. Records hold `category` (the subtask), `image`, `label` ("yes"/"no") and `prediction` (model text).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .records import require_text

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """MME's own rule: "yes"/"no" when the answer is that word or its first four characters hold it, else "other".

    The comparison is case-insensitive; "other" never matches a label, so it counts as wrong.
    """
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    if "yes" in answer[:4]:
        return "yes"
    if "no" in answer[:4]:
        return "no"
    return "other"


def score_mme(records: list[Mapping[str, Any]], source: str = "MME answers") -> dict[str, Any]:
    """Scores per subtask plus the perception, cognition and overall sums.

    Returns {"subtasks": {name: {"acc", "acc_plus", "score", "questions", "images"}}, "perception": float,
    "cognition": float, "total": float}; acc and acc_plus are fractions, scores are points. Perception and
    cognition sum the subtasks present under MME's names; total sums every subtask given.
    """
    # subtask -> image -> whether each of its questions was right
    outcomes: dict[str, dict[str, list[bool]]] = {}
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        label = require_text(record, "label", where).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: field 'label' must be 'yes' or 'no', got {record['label']!r}")
        subtask = require_text(record, "category", where)
        image = require_text(record, "image", where)
        correct = parse_mme_answer(require_text(record, "prediction", where)) == label
        outcomes.setdefault(subtask, {}).setdefault(image, []).append(correct)
    if not outcomes:
        raise ValueError(f"{source}: no records")

    subtasks = {}
    for subtask, images in outcomes.items():
        answers = [correct for image_answers in images.values() for correct in image_answers]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(image_answers) for image_answers in images.values()) / len(images)
        subtasks[subtask] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": (acc + acc_plus) * 100,
            "questions": len(answers),
            "images": len(images),
        }
    return {
        "subtasks": subtasks,
        "perception": sum(subtasks[name]["score"] for name in MME_PERCEPTION if name in subtasks),
        "cognition": sum(subtasks[name]["score"] for name in MME_COGNITION if name in subtasks),
        "total": sum(scores["score"] for scores in subtasks.values()),
    }
