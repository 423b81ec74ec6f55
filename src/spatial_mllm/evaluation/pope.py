"""POPE (object hallucination): yes/no answer parsing and accuracy, precision, recall, F1, yes-ratio per split.

"yes" is the positive class, as in POPE's own evaluation. Question records hold `question_id`, `label`
("yes"/"no") and `category` (the split: random, popular or adversarial, as in LLaVA's POPE question file);
answer records hold `question_id` and `text` (LLaVA's answers JSONL).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import pair_with_answers, read_jsonl, require_text

POPE_SPLITS = ("random", "popular", "adversarial")
METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(text: str) -> str:
    """Read a free-text answer as "yes" or "no" the way POPE does, plus a first-word rule.

    Only the first sentence counts (POPE keeps the text before the first period). When its first word is "yes" or
    "no", that word decides ("Yes, there is no cat." -> yes, where POPE alone would say no). Otherwise, as in POPE,
    a sentence containing the word "no" or "not" is no and anything else, empty text included, is yes. Words are
    compared case-insensitively with surrounding punctuation removed ("NO!" -> no).
    """
    first_sentence = text.split(".", 1)[0]
    words = [word.strip(string.punctuation).lower() for word in first_sentence.replace(",", " ").split()]
    words = [word for word in words if word]
    if words and words[0] in ("yes", "no"):
        return words[0]
    return "no" if "no" in words or "not" in words else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Confusion counts and metrics for parsed predictions against labels, both sequences of "yes"/"no".

    precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), accuracy = (TP+TN)/N, yes_ratio = #yes/N.
    A ratio whose denominator is zero (no "yes" predicted, say) is 0.0 rather than an error.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no POPE answers to score")
    for kind, values in (("prediction", predictions), ("label", labels)):
        bad = [value for value in values if value not in ("yes", "no")]
        if bad:
            raise ValueError(f"every {kind} must be 'yes' or 'no'; got {bad[0]!r}")
    pairs = list(zip(predictions, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / len(pairs),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "total": len(pairs),
    }


def pope_label(question: Mapping[str, Any], where: str) -> str:
    """A POPE question's label ("yes"/"no"), after checking it and the split it belongs to (`category`)."""
    label = require_text(question, "label", where).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"{where}: field 'label' must be 'yes' or 'no', got {question['label']!r}")
    split = question.get("category")
    if not isinstance(split, str) or not split:
        raise ValueError(f"{where}: field 'category' (the POPE split) must be a non-empty string, got {split!r}")
    return label


def score_pope(
    questions: list[Mapping[str, Any]],
    answers: list[Mapping[str, Any]],
    questions_source: str = "POPE questions",
    answers_source: str = "POPE answers",
) -> dict[str, Any]:
    """Metrics per split and their mean over splits (LLaVA reports the mean F1).

    Returns {"splits": {split: pope_metrics(...)}, "mean": {metric: mean over splits}}; the three POPE splits come
    first in their usual order, any other split name after them.
    """
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for index, question, answer in pair_with_answers(questions, answers, questions_source, answers_source):
        where = f"{questions_source} record {index}"
        label = pope_label(question, where)
        split = question["category"]
        text = require_text(answer, "text", f"{answers_source}, answer to question_id {question['question_id']!r}")
        predictions, labels = by_split.setdefault(split, ([], []))
        predictions.append(parse_yes_no(text))
        labels.append(label)
    if not by_split:
        raise ValueError(f"{questions_source}: no questions")
    ordered = [split for split in POPE_SPLITS if split in by_split] + sorted(set(by_split) - set(POPE_SPLITS))
    splits = {split: pope_metrics(*by_split[split]) for split in ordered}
    mean = {name: sum(metrics[name] for metrics in splits.values()) / len(splits) for name in METRIC_NAMES}
    return {"splits": splits, "mean": mean}


def score_pope_files(questions_path: str | Path, answers_path: str | Path) -> dict[str, Any]:
    """`score_pope` on a question JSONL (with labels and splits) and an answers JSONL."""
    return score_pope(read_jsonl(questions_path), read_jsonl(answers_path), str(questions_path), str(answers_path))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
