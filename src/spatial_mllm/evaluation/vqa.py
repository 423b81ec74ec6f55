"""Short-answer metrics: GQA-style exact match and the VQA soft accuracy with its answer normalisation.

The VQA rules follow the official VQAv2 evaluation (vqaEval.py), including its quirks, so that numbers compare
with published ones; where we differ it is said next to the rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from itertools import combinations

ARTICLES = frozenset({"a", "an", "the"})

# --- GQA-style exact match -------------------------------------------------------------------------------------

_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")


def normalize_short_answer(text: str) -> str:
    """Lowercase, drop apostrophes ("men's" -> "mens"), turn other punctuation into spaces, drop articles.

    LLaVA's GQA conversion only strips a trailing period and lowercases; this is a superset of that, so a model
    that answers "A red cube." still matches "red cube".
    """
    text = text.lower().replace("'", "")
    text = _NOT_WORD_OR_SPACE.sub(" ", text)
    return " ".join(word for word in text.split() if word not in ARTICLES)


def exact_match(prediction: str, gold: str) -> bool:
    """GQA accuracy for one question: the normalised strings are equal."""
    return normalize_short_answer(prediction) == normalize_short_answer(gold)


# --- VQA answer normalisation ------------------------------------------------------------------------------------

# The characters the official script treats as punctuation. The period is handled apart (decimals) and the
# apostrophe is kept (contractions).
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official regex "(?!<=\d)(\.)(?!\d)" means to keep decimal points but, as written, keeps every period that
# is followed by a digit (".5" too); we reproduce what it does, not what it meant.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# Official "manualMap": number words become digits, and "none" counts as zero.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

# The contractions the official table restores. The table lists, for each, the spellings with apostrophes left
# out ("dont" -> "don't", "couldnt've" -> "couldn't've"); we generate those spellings instead of listing them.
# Forms whose apostrophe-free spelling is an ordinary word (we'll, we're, it's, she'd, I'll) are absent, as in the
# official table; the official keys "Im"/"Ive" are capitalised and so never match lowercased text: left out too.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _spellings_missing_apostrophes(contraction: str) -> Iterator[str]:
    """Every spelling of `contraction` with one or more of its apostrophes left out."""
    positions = [i for i, char in enumerate(contraction) if char == "'"]
    for count in range(1, len(positions) + 1):
        for dropped in combinations(positions, count):
            yield "".join(char for i, char in enumerate(contraction) if i not in dropped)


CONTRACTION_FIXES = {
    spelling: contraction for contraction in _CONTRACTIONS for spelling in _spellings_missing_apostrophes(contraction)
}


def _strip_vqa_punctuation(text: str) -> str:
    # Official rule: a mark is deleted when it touches a space ("yes , it" -> "yes it") and becomes a space
    # otherwise ("black-white" -> "black white"); when the text holds a digit,digit comma ("1,000") every mark
    # is deleted so numbers stay whole. The test looks at the original text, not the text being rewritten.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    stripped = text
    for mark in _VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", stripped)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer processing: punctuation, periods, lowercase, number words, articles, contractions.

    "Two dogs." -> "2 dogs"; "1,000" -> "1000"; "3.5" stays; "dont know" -> "don't know"; "The red one" -> "red 1".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = _strip_vqa_punctuation(text).lower().split()
    words = [NUMBER_WORDS.get(word, word) for word in words]
    return " ".join(CONTRACTION_FIXES.get(word, word) for word in words if word not in ARTICLES)


# --- VQA soft accuracy -------------------------------------------------------------------------------------------


def vqa_soft_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2, VizWiz, TextVQA).

    For each human, leave that human out and score min(#other humans who gave the prediction / 3, 1); the
    accuracy is the mean over those leave-one-out subsets. With 10 humans, k matching give 0.3 (k=1), 0.6 (k=2),
    0.9 (k=3) and 1.0 (k>=4). Prediction and human answers always go through `normalize_vqa_answer`; the official
    script skips that when all humans agree, so there "Yes." would not match ten "yes" (here it does).
    """
    if isinstance(human_answers, str):
        raise ValueError(f"human answers must be a list of strings, got the string {human_answers!r}")
    if len(human_answers) < 2:
        raise ValueError(
            f"VQA soft accuracy needs several human answers (10 in VQAv2), got {len(human_answers)}: {human_answers!r}"
        )
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in human_answers]
    total = sum(matches)
    # Leaving out human i, the other humans match `total - matches[i]` times.
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def mean_vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Benchmark-level VQA accuracy: the mean of `vqa_soft_accuracy` over questions."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions but {len(human_answers)} lists of human answers")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(map(vqa_soft_accuracy, predictions, human_answers)) / len(predictions)

