"""Multiple choice: reading the chosen letter out of free text, and MMBench's circular evaluation.

Circular evaluation asks each question once per rotation of its options (A B C D, B C D A, ...) and counts the
question as right only when every rotation is answered right, which removes the gain of a model that prefers
one letter.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .records import require_field

OPTION_LETTERS = string.ascii_uppercase
ROTATION_SEPARATOR = "@rot"  # question_id of rotation k of question q: f"{q}@rot{k}"

# "B", "B.", "(B)", "[b]", "B)": the whole answer is one letter, maybe bracketed or followed by a mark.
_LONE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?")
# "B. red circle", "(B) red circle", "B: red": an upper-case letter with a delimiter opens the answer.
_LEADING_LETTER = re.compile(r"[(\[]([A-Z])[)\]]|([A-Z])[.:)](?:\s|$)")
# "The answer is B", "Answer: (C)", "the correct option is D."
_STATED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*[(\[]?([A-Z])(?![A-Za-z'])")
# Any upper-case letter standing alone as a word.
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_PUNCTUATION = re.compile(r"[^\w\s]")


def option_letters(count: int) -> str:
    """The letters naming `count` options: "ABCD" for 4."""
    if not 1 <= count <= len(OPTION_LETTERS):
        raise ValueError(f"a multiple-choice question needs 1 to {len(OPTION_LETTERS)} options, got {count}")
    return OPTION_LETTERS[:count]


def format_options(options: Sequence[str]) -> str:
    """The options as LLaVA's MMBench prompt lists them: one "A. text" line each."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


def extract_choice_letter(text: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-text answer chooses, or None when it chooses none or several.

    Tried in order: the whole answer is a letter ("B", "b.", "(B)"); a letter with a delimiter opens it
    ("B. red circle"); a stated letter ("The answer is B"); the text of exactly one option ("red circle", also
    inside a sentence; an option contained in a longer matching option yields to it); finally a single
    upper-case letter standing alone ("I think C"), where "A" and "I" followed by a lower-case word are read as
    the article and the pronoun. With `options`, only their letters count.
    """
    valid = option_letters(len(options)) if options is not None else OPTION_LETTERS
    answer = text.strip()

    lone = _LONE_LETTER.fullmatch(answer)
    if lone and lone.group(1).upper() in valid:
        return lone.group(1).upper()
    leading = _LEADING_LETTER.match(answer)
    if leading:
        letter = leading.group(1) or leading.group(2)
        if letter in valid:
            return letter
    stated = _STATED_LETTER.search(answer)
    if stated and stated.group(1) in valid:
        return stated.group(1)
    if options is not None:
        by_text = _letter_from_option_text(answer, options)
        if by_text is not None:
            return by_text
    standalone = {
        match.group(1)
        for match in _STANDALONE_LETTER.finditer(answer)
        if match.group(1) in valid and not _is_article_or_pronoun(answer, match)
    }
    return standalone.pop() if len(standalone) == 1 else None


def _normalize_option_text(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _letter_from_option_text(answer: str, options: Sequence[str]) -> str | None:
    normalized_answer = _normalize_option_text(answer)
    normalized_options = [_normalize_option_text(option) for option in options]
    exact = [i for i, option in enumerate(normalized_options) if option and option == normalized_answer]
    if len(exact) == 1:
        return OPTION_LETTERS[exact[0]]
    padded_answer = f" {normalized_answer} "
    contained = [i for i, option in enumerate(normalized_options) if option and f" {option} " in padded_answer]
    # "dark red" matching makes "red" match too; the longer option is the one meant.
    outermost = [
        i
        for i in contained
        if not any(j != i and f" {normalized_options[i]} " in f" {normalized_options[j]} " for j in contained)
    ]
    return OPTION_LETTERS[outermost[0]] if len(outermost) == 1 else None


def _is_article_or_pronoun(answer: str, match: re.Match[str]) -> bool:
    return match.group(1) in "AI" and re.match(r"\s+[a-z]", answer[match.end() :]) is not None


def choice_question_parts(record: Mapping[str, Any], where: str) -> tuple[list[str], str]:
    """(options, answer_letter) of a multiple-choice record, checked; the letter is upper-cased."""
    options = require_field(record, "options", where)
    if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
        raise ValueError(f"{where}: field 'options' must be a list of strings, got {options!r}")
    if len(options) < 2:
        raise ValueError(f"{where}: a multiple-choice question needs at least 2 options, got {len(options)}")
    letters = option_letters(len(options))
    answer_letter = require_field(record, "answer_letter", where)
    if not isinstance(answer_letter, str) or answer_letter.strip().upper() not in letters:
        raise ValueError(f"{where}: field 'answer_letter' must be one of {', '.join(letters)}, got {answer_letter!r}")
    return options, answer_letter.strip().upper()


def circular_variants(record: Mapping[str, Any], where: str = "question") -> list[dict[str, Any]]:
    """One copy of a multiple-choice question per rotation of its options, as MMBench's circular evaluation.

    The record needs `question_id`, `options` and `answer_letter`; its other fields are copied unchanged. Rotation
    k starts the options at the k-th one (rotation 0 is the question as given); each copy gets
    question_id f"{question_id}@rot{k}", `circular_group` (the original question_id), `rotation`, the rotated
    `options` and the `answer_letter` that now names the right option.
    """
    question_id = require_field(record, "question_id", where)
    options, answer_letter = choice_question_parts(record, where)
    correct = OPTION_LETTERS.index(answer_letter)
    count = len(options)
    return [
        {
            **record,
            "question_id": f"{question_id}{ROTATION_SEPARATOR}{shift}",
            "circular_group": question_id,
            "rotation": shift,
            "options": options[shift:] + options[:shift],
            "answer_letter": OPTION_LETTERS[(correct - shift) % count],
        }
        for shift in range(count)
    ]


def circular_accuracy(graded: Iterable[tuple[Any, bool]]) -> dict[str, float | int]:
    """Score (circular_group, correct) pairs, one per answered rotation.

    A group counts as right only when all its rotations are right. Returns `accuracy` (circular, over groups),
    `groups`, `groups_correct`, and `variant_accuracy`, the plain accuracy over all rotations, for comparison.
    """
    group_correct: dict[Any, bool] = {}
    variants = variants_correct = 0
    for group, correct in graded:
        group_correct[group] = group_correct.get(group, True) and bool(correct)
        variants += 1
        variants_correct += bool(correct)
    if not group_correct:
        raise ValueError("no graded multiple-choice answers to score")
    groups_correct = sum(group_correct.values())
    return {
        "accuracy": groups_correct / len(group_correct),
        "groups": len(group_correct),
        "groups_correct": groups_correct,
        "variant_accuracy": variants_correct / variants,
    }
