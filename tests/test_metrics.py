"""Metrics against hand-computed cases: VQA/GQA, POPE, multiple choice (circular), MME, the built-in benchmark."""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from spatial_mllm.evaluation.metrics import accuracy_by_group, score_answers
from spatial_mllm.evaluation.mme import parse_mme_answer, score_mme
from spatial_mllm.evaluation.multiple_choice import (
    circular_accuracy,
    circular_variants,
    extract_choice_letter,
    format_options,
)
from spatial_mllm.evaluation.pope import parse_yes_no, pope_metrics, score_pope_files
from spatial_mllm.evaluation.records import read_jsonl
from spatial_mllm.evaluation.vqa import (
    CONTRACTION_FIXES,
    exact_match,
    normalize_short_answer,
    normalize_vqa_answer,
    vqa_soft_accuracy,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- GQA exact match ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("A red cube.", "red cube", True),
        ("The Men's room", "mens room", True),
        ("T-shirt", "t shirt", True),
        ("  LEFT ", "left", True),
        ("red", "red cube", False),
        ("2", "two", False),  # GQA does not map number words
    ],
)
def test_exact_match(prediction, gold, expected):
    assert exact_match(prediction, gold) is expected


def test_normalize_short_answer():
    assert normalize_short_answer("The cat, on the mat!") == "cat on mat"


# --- VQA normalisation and soft accuracy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("1,000", "1000"),  # digit,digit comma: punctuation deleted, number stays whole
        ("3.5", "3.5"),  # decimal point kept
        ("2.", "2"),
        ("yes, it is", "yes it is"),  # comma touching a space is deleted
        ("black-and-white", "black and white"),  # hyphen not touching a space becomes one
        ("a (b)", "b"),  # "(" touches a space: deleted; ")" does not: space; article dropped
        ("u.s.a.", "usa"),
        ("dont know", "don't know"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("The red one", "red 1"),
        ("None", "0"),
        ("Ten!!", "10"),
        ("What's\tup\n", "what's up"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_contraction_table_restores_apostrophes_but_leaves_ordinary_words():
    assert CONTRACTION_FIXES["dont"] == "don't"
    assert CONTRACTION_FIXES["yall'd've"] == "y'all'd've"
    assert CONTRACTION_FIXES["twas"] == "'twas"
    for word in ("well", "were", "its", "id", "ill", "shell", "wed", "lets"):
        assert word not in CONTRACTION_FIXES
    # every key is its value with apostrophes left out
    for spelling, contraction in CONTRACTION_FIXES.items():
        assert spelling.replace("'", "") == contraction.replace("'", "") and spelling != contraction


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_by_number_of_matching_humans(matching, expected):
    humans = ["yes"] * matching + ["no"] * (10 - matching)
    assert vqa_soft_accuracy("yes", humans) == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "expected"), [("Two.", 1.0), ("3", 0.9), ("four", 0.9), ("5", 0.0)])
def test_vqa_soft_accuracy_matches_brute_force_over_nine_human_subsets(prediction, expected):
    # after normalisation: four humans say 2, three say 3, three say 4
    humans = ["2", "two", "2 ", "3", "three", "2.", "4", "4", "four", "Three"]
    predicted = normalize_vqa_answer(prediction)
    subsets = list(combinations(humans, 9))
    brute_force = sum(min(1.0, sum(normalize_vqa_answer(h) == predicted for h in s) / 3) for s in subsets) / 10
    assert brute_force == pytest.approx(expected)
    assert vqa_soft_accuracy(prediction, humans) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_prediction_even_when_humans_agree():
    assert vqa_soft_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_soft_accuracy_rejects_bad_human_answers():
    with pytest.raises(ValueError, match="several human answers"):
        vqa_soft_accuracy("yes", ["yes"])
    with pytest.raises(ValueError, match="list of strings"):
        vqa_soft_accuracy("yes", "yes yes")


# --- POPE ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("NO!", "no"),
        ("Yes, there is no cat.", "yes"),  # the first word decides
        ("There is no cat in the image.", "no"),
        ("I do not see one", "no"),
        ("There is a cat. No other animal.", "yes"),  # only the first sentence counts
        ("Nothing like that", "yes"),  # "nothing" is not the word "no"
        ("", "yes"),
    ],
)
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_file_scored_by_hand(tmp_path):
    questions = [
        # random: labels yes yes yes no no no
        {"question_id": 1, "label": "yes", "category": "random", "text": "Is there a dog in the image?"},
        {"question_id": 2, "label": "yes", "category": "random", "text": "Is there a cat in the image?"},
        {"question_id": 3, "label": "yes", "category": "random", "text": "Is there a car in the image?"},
        {"question_id": 4, "label": "no", "category": "random", "text": "Is there a bus in the image?"},
        {"question_id": 5, "label": "no", "category": "random", "text": "Is there a cup in the image?"},
        {"question_id": 6, "label": "no", "category": "random", "text": "Is there a dog in the image?"},
        # popular: labels yes no yes no
        {"question_id": 7, "label": "yes", "category": "popular", "text": "Is there a person in the image?"},
        {"question_id": 8, "label": "No", "category": "popular", "text": "Is there a chair in the image?"},
        {"question_id": 9, "label": "yes", "category": "popular", "text": "Is there a table in the image?"},
        {"question_id": 10, "label": "no", "category": "popular", "text": "Is there a bottle in the image?"},
    ]
    answers = [
        {"question_id": 1, "text": "Yes"},  # TP
        {"question_id": 2, "text": "Yes, it is."},  # TP
        {"question_id": 3, "text": "No"},  # FN
        {"question_id": 4, "text": "No."},  # TN
        {"question_id": 5, "text": "Yes"},  # FP
        {"question_id": 6, "text": "There is no dog."},  # TN
        {"question_id": 7, "text": "yes"},  # TP
        {"question_id": 8, "text": "yes"},  # FP
        {"question_id": 9, "text": "Yes"},  # TP
        {"question_id": 10, "text": "I do not think so"},  # TN
    ]
    result = score_pope_files(write_jsonl(tmp_path / "q.jsonl", questions), write_jsonl(tmp_path / "a.jsonl", answers))

    assert list(result["splits"]) == ["random", "popular"]
    random = result["splits"]["random"]
    assert (random["tp"], random["fp"], random["tn"], random["fn"], random["total"]) == (2, 1, 2, 1, 6)
    assert random["accuracy"] == pytest.approx(4 / 6)
    assert random["precision"] == pytest.approx(2 / 3)
    assert random["recall"] == pytest.approx(2 / 3)
    assert random["f1"] == pytest.approx(2 / 3)
    assert random["yes_ratio"] == pytest.approx(0.5)

    popular = result["splits"]["popular"]
    assert (popular["tp"], popular["fp"], popular["tn"], popular["fn"]) == (2, 1, 1, 0)
    assert popular["accuracy"] == pytest.approx(0.75)
    assert popular["precision"] == pytest.approx(2 / 3)
    assert popular["recall"] == pytest.approx(1.0)
    assert popular["f1"] == pytest.approx(0.8)
    assert popular["yes_ratio"] == pytest.approx(0.75)

    assert result["mean"]["f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["mean"]["accuracy"] == pytest.approx((4 / 6 + 0.75) / 2)


def test_pope_metrics_with_no_yes_predicted_gives_zero_precision():
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_pope_errors_name_the_problem(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "label": "maybe", "category": "random"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(ValueError, match=r"q\.jsonl record 0: field 'label' must be 'yes' or 'no'"):
        score_pope_files(questions, answers)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "label": "yes", "category": "random"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 2, "text": "yes"}])
    with pytest.raises(ValueError, match=r"a\.jsonl: no answer for 1 questions .*'1'"):
        score_pope_files(questions, answers)
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["maybe"], ["yes"])


# --- multiple choice ----------------------------------------------------------------------------------------------

OPTIONS = ["red circle", "blue square", "green triangle", "dark red circle"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("The answer is B", "B"),
        ("Answer: (C)", "C"),
        ("B. red circle", "B"),  # the letter wins over the text that follows it
        ("blue square", "B"),  # option text only
        ("A blue square.", "B"),  # "A" is the article here
        ("It is the green triangle.", "C"),
        ("dark red circle", "D"),  # contains "red circle" too; the longer option is meant
        ("I think C is right", "C"),  # "I" is the pronoun
        ("E", None),  # not an option letter
        ("C or D", None),  # two letters: no single choice
        ("I don't know", None),
    ],
)
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text, OPTIONS) == letter


def test_extract_choice_letter_without_options_accepts_any_letter():
    assert extract_choice_letter("(F)") == "F"
    assert extract_choice_letter("red circle") is None


def test_format_options():
    assert format_options(["left", "right"]) == "A. left\nB. right"


def test_circular_variants_rotate_options_and_answer():
    question = {"question_id": "q7", "question": "Where is the cube?", "options": ["left", "right", "above"],
                "answer_letter": "B", "category": "relation"}  # fmt: skip
    variants = circular_variants(question)
    assert [v["question_id"] for v in variants] == ["q7@rot0", "q7@rot1", "q7@rot2"]
    assert [v["options"] for v in variants] == [["left", "right", "above"], ["right", "above", "left"],
                                                 ["above", "left", "right"]]  # fmt: skip
    assert [v["answer_letter"] for v in variants] == ["B", "A", "C"]
    for variant in variants:
        # the letter still names "right", and the other fields are carried over
        assert variant["options"]["ABC".index(variant["answer_letter"])] == "right"
        assert variant["circular_group"] == "q7"
        assert (variant["category"], variant["question"]) == ("relation", question["question"])
    assert question["question_id"] == "q7"  # the input is left alone


def test_circular_accuracy_counts_a_question_only_when_every_rotation_is_right():
    questions = [
        {"question_id": "q1", "options": ["left", "right", "above", "below"], "answer_letter": "A"},
        {"question_id": "q2", "options": ["cube", "sphere", "cone", "torus"], "answer_letter": "C"},
    ]
    variants = [variant for question in questions for variant in circular_variants(question)]

    def grade(answer_of):
        return [
            (v["circular_group"], extract_choice_letter(answer_of(v), v["options"]) == v["answer_letter"])
            for v in variants
        ]

    # Always "A": right once per question (the rotation where the answer is A), so no question survives.
    always_a = circular_accuracy(grade(lambda v: "A"))
    assert always_a == {"accuracy": 0.0, "groups": 2, "groups_correct": 0, "variant_accuracy": 0.25}
    # Knows q1 ("left" whatever its letter), always says "C" on q2: 1 of 2 questions, 5 of 8 rotations.
    knows_q1 = circular_accuracy(grade(lambda v: "left" if v["circular_group"] == "q1" else "C"))
    assert knows_q1 == {"accuracy": 0.5, "groups": 2, "groups_correct": 1, "variant_accuracy": 5 / 8}


def test_circular_variants_reject_bad_answer_letter():
    with pytest.raises(ValueError, match="q1: field 'answer_letter' must be one of A, B"):
        circular_variants({"question_id": 1, "options": ["x", "y"], "answer_letter": "C"}, where="q1")


# --- MME ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), ("no.", "no"), ("Yes, it is.", "yes"), ("Not really", "no"), ("Maybe", "other")],
)
def test_parse_mme_answer(text, parsed):
    assert parse_mme_answer(text) == parsed


def test_score_mme_by_hand():
    def rec(category, image, label, prediction):
        return {"category": category, "image": image, "label": label, "prediction": prediction}

    records = [
        # position: img1 both right, img2 one right, img3 none -> acc 3/6, acc+ 1/3
        rec("position", "img1.jpg", "yes", "Yes"),
        rec("position", "img1.jpg", "no", "No"),
        rec("position", "img2.jpg", "yes", "Yes"),
        rec("position", "img2.jpg", "no", "Yes"),
        rec("position", "img3.jpg", "yes", "No"),
        rec("position", "img3.jpg", "no", "Yes"),
        # count: one image, both right -> 200
        rec("count", "img1.jpg", "Yes", "yes"),
        rec("count", "img1.jpg", "No", "no"),
        # code_reasoning (cognition): one right, one unreadable -> acc 0.5, acc+ 0 -> 50
        rec("code_reasoning", "code1.png", "yes", "yes"),
        rec("code_reasoning", "code1.png", "no", "I cannot tell"),
    ]
    result = score_mme(records)
    position = result["subtasks"]["position"]
    assert position["acc"] == pytest.approx(0.5)
    assert position["acc_plus"] == pytest.approx(1 / 3)
    assert position["score"] == pytest.approx(50 + 100 / 3)
    assert (position["questions"], position["images"]) == (6, 3)
    assert result["subtasks"]["count"]["score"] == pytest.approx(200.0)
    assert result["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(250 + 100 / 3)
    assert result["cognition"] == pytest.approx(50.0)
    assert result["total"] == pytest.approx(300 + 100 / 3)


def test_score_mme_names_the_bad_record():
    with pytest.raises(ValueError, match="MME answers record 0: missing field 'image'"):
        score_mme([{"category": "count", "label": "yes", "prediction": "yes"}])


# --- built-in spatial benchmark -----------------------------------------------------------------------------------

KEY = [
    {"question_id": "q1", "answer": "left", "category": "left_right", "type": "short"},
    {"question_id": "q2", "answer": "2", "category": "count", "type": "short"},
    {"question_id": "q3", "answer": "3", "category": "count", "type": "short"},
    {"question_id": "q4", "answer": "above", "category": "relation", "type": "mc",
     "options": ["left of", "right of", "above", "below"], "answer_letter": "C"},
    # letter not given: it follows from the option text
    {"question_id": "q5", "answer": "below", "category": "relation", "type": "mc",
     "options": ["left of", "right of", "above", "below"]},
    {"question_id": "q6", "answer": "no", "category": "left_right", "type": "yesno"},
]  # fmt: skip
ANSWERS = [
    {"question_id": "q6", "text": "No, it is not."},  # right
    {"question_id": "q1", "text": "Left."},  # right
    {"question_id": "q2", "text": "two"},  # right: number words count
    {"question_id": "q3", "text": "4"},  # wrong
    {"question_id": "q4", "text": "C. above"},  # right
    {"question_id": "q5", "text": "The answer is A"},  # wrong (right is D)
]


def test_score_answers_per_category_and_type():
    result = score_answers(ANSWERS, KEY)
    assert result["overall"] == pytest.approx(4 / 6)
    assert result["categories"] == pytest.approx({"count": 0.5, "left_right": 1.0, "relation": 0.5})
    assert result["types"] == pytest.approx({"mc": 0.5, "short": 2 / 3, "yesno": 1.0})
    assert result["counts"]["overall"] == {"correct": 4, "total": 6}
    assert result["counts"]["categories"]["count"] == {"correct": 1, "total": 2}
    rows = {row["question_id"]: row for row in result["per_question"]}
    assert [row["question_id"] for row in result["per_question"]] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert (rows["q5"]["parsed"], rows["q5"]["correct"]) == ("A", False)
    assert (rows["q2"]["parsed"], rows["q2"]["correct"]) == ("2", True)
    assert rows["q6"]["parsed"] == "no"


def test_accuracy_by_group_micro_averages():
    result = accuracy_by_group([("a", True), ("a", True), ("a", False), ("b", False)])
    assert result["overall"] == 0.5  # 2 of 4, not the mean of 2/3 and 0
    assert result["groups"] == pytest.approx({"a": 2 / 3, "b": 0.0})


@pytest.mark.parametrize(
    ("key_change", "answers", "message"),
    [
        ({}, ANSWERS[:-1], r"answers: no answer for 1 questions of answer key: 'q5'"),
        ({}, ANSWERS + [{"question_id": "q9", "text": "x"}], r"1 answers whose question_id is not in answer key: 'q9'"),
        ({}, ANSWERS + [{"question_id": "q1", "text": "x"}], r"answers record 6: question_id 'q1' appears twice"),
        ({2: {"category": None}}, ANSWERS, r"answer key record 2: missing field 'category'"),
        ({0: {"type": "essay"}}, ANSWERS, r"answer key record 0: field 'type' must be one of short, mc, yesno"),
        ({3: {"answer_letter": "E"}}, ANSWERS, r"answer key record 3: field 'answer_letter' must be one of A, B, C, D"),
        ({3: {"answer_letter": "B"}}, ANSWERS, r"answer key record 3: answer 'above' disagrees with answer_letter 'B'"),
        ({5: {"answer": "maybe"}}, ANSWERS, r"answer key record 5: a yesno question needs answer 'yes' or 'no'"),
    ],
)
def test_score_answers_errors_name_the_place(key_change, answers, message):
    key = [{**record, **key_change.get(index, {})} for index, record in enumerate(KEY)]
    with pytest.raises(ValueError, match=message):
        score_answers(answers, key)


def test_score_answers_names_a_missing_text_field():
    answers = [dict(answer) for answer in ANSWERS]
    del answers[2]["text"]
    with pytest.raises(ValueError, match=r"answers\.jsonl, answer to question_id 'q2': missing field 'text'"):
        score_answers(answers, KEY, answers_source="answers.jsonl")


def test_read_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1}\n\n{"question_id": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"answers\.jsonl, line 3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"question_id": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    path.write_text('{"question_id": 1}\n\n{"question_id": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"question_id": 1}, {"question_id": 2}]
