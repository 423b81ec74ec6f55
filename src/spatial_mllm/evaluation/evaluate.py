"""Evaluating a model on a question file: answer it, score it, and write both beside each other.

`evaluate_questions` is what `spatial-mllm eval` does, as a library function: it writes LLaVA's answers JSONL and,
beside it, a scores JSON (suffix `.scores.json`) holding the run's facts (name, projector, visual tokens,
projector parameters, latency, tokens/s, a digest of the question file) with the scores, which `report` takes as
they are. Everything that can be checked without the model (question lines, the answer key, POPE labels) is
checked before generation starts, so a bad file fails in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import file_digest
from ..files import check_output, write_json
from .metrics import read_key_item, score_answers
from .pope import pope_label, score_pope
from .records import describe_ids, read_jsonl
from .runner import EvalResult, Question, QuestionProblem, answer_questions, read_questions

SCORES_SUFFIX = ".scores.json"


@dataclass
class Evaluation:
    """One evaluated question file: the answers written, the scores (with the run's facts) and the lines skipped."""

    answers_file: Path
    scores_file: Path
    scores: dict[str, Any]
    answered: int
    skipped: list[QuestionProblem]

    @property
    def benchmark(self) -> str | None:
        return self.scores.get("benchmark")


def scores_path(answers_file: Path) -> Path:
    """answers.jsonl -> answers.scores.json, beside it."""
    return Path(answers_file).with_suffix(SCORES_SUFFIX)


def default_run_name(model_dir: Path) -> str:
    """The model folder with its parent (runs/demo/saep/stage2 -> saep/stage2): training writes stage folders of
    the same name for every projector, and report needs names that differ."""
    folder = Path(model_dir).resolve()
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name


@dataclass
class EvalPlan:
    """Everything about an evaluation that is checked before a model is loaded: the questions that can be asked
    (and the lines that cannot), the answer key, the outputs and the generation settings."""

    questions_file: Path
    image_folder: Path | None
    out_file: Path
    questions: list[Question]
    skipped: list[QuestionProblem]
    answer_key: Path | None = None
    key: list[dict[str, Any]] | None = None
    pope: bool = False
    name: str | None = None
    model_dir: Path | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    suffix: str = ""
    strict: bool = False


def plan_evaluation(
    questions_file: str | Path,
    image_folder: str | Path | None,
    out_file: str | Path,
    *,
    answer_key: str | Path | None = None,
    pope: bool = False,
    name: str | None = None,
    model_dir: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    suffix: str = "",
    strict: bool = False,
    overwrite: bool = False,
) -> EvalPlan:
    """Read and check what `evaluate` needs, so that a bad file fails in seconds rather than after loading a model
    and generating: the question lines (broken ones skipped and listed, or the first raised with `strict`), the
    answer key against them, POPE labels, and the outputs (an existing answers or scores file is replaced only with
    `overwrite`; an output that is an input is refused)."""
    if answer_key is not None and pope:
        raise ValueError("score with an answer key or as POPE, not both")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch size and max_new_tokens must be at least 1")
    questions_file, out_file = Path(questions_file), Path(out_file)
    inputs = {"--questions": questions_file, "--answer-key": answer_key, "--model": model_dir}
    check_output(out_file, "--out", inputs=inputs, overwrite=overwrite)
    check_output(scores_path(out_file), "scores file", inputs=inputs, overwrite=overwrite)
    folder = Path(image_folder) if image_folder is not None else None
    questions, problems = read_questions(questions_file, folder, strict)
    if not questions:
        first = f"; the first: {problems[0]}" if problems else ""
        raise ValueError(f"{questions_file}: no question can be answered ({len(problems)} lines skipped{first})")
    key = read_answer_key(Path(answer_key), questions, problems) if answer_key is not None else None
    if pope:
        check_pope_labels(questions_file, questions)
    return EvalPlan(
        questions_file, folder, out_file, questions, problems, Path(answer_key) if answer_key else None, key, pope,
        name, Path(model_dir) if model_dir is not None else None, batch_size, max_new_tokens, suffix, strict,
    )


def evaluate(model, processor, plan: EvalPlan, progress: bool = True) -> Evaluation:
    """Answer the plan's questions greedily with a loaded model and its processor (prompted with the processor's
    chat template), write the answers, score them against the answer key (the built-in world's) or as POPE
    (labels in the question file), and write the scores with the run's facts beside the answers."""
    model_id = plan.model_dir.name if plan.model_dir is not None else (plan.name or "model")
    result = answer_questions(
        model, processor, plan.questions, plan.image_folder, plan.out_file, model_id, plan.batch_size,
        plan.max_new_tokens, plan.suffix, plan.strict, progress,
    )
    result.problems = plan.skipped + result.problems
    name = plan.name or (default_run_name(plan.model_dir) if plan.model_dir is not None else model_id)
    facts = run_facts(model, result, plan.questions_file, name, plan.model_dir, plan.batch_size, plan.max_new_tokens,
                      plan.suffix)
    if plan.key is not None:
        facts.update(score_with_key(plan.answer_key, plan.key, result))
    elif plan.pope:
        facts.update(score_pope_run(plan.questions_file, result))
    path = write_json(scores_path(result.answers_file), facts)
    return Evaluation(result.answers_file, path, facts, result.answered, result.problems)


def evaluate_questions(model, processor, questions_file, image_folder, out_file, *, progress: bool = True,
                       **options) -> Evaluation:
    """`plan_evaluation` then `evaluate`, for a model already loaded (options as `plan_evaluation` takes them)."""
    return evaluate(model, processor, plan_evaluation(questions_file, image_folder, out_file, **options), progress)


def run_facts(
    model,
    result: EvalResult,
    questions_file: Path,
    name: str,
    model_dir: str | Path | None,
    batch_size: int,
    max_new_tokens: int,
    suffix: str,
) -> dict[str, Any]:
    """What `report` needs besides the scores, measured on this run."""
    seconds = result.seconds
    per_question = 1000 * seconds / result.answered if result.answered and seconds > 0 else None
    return {
        "name": name,
        "model": str(model_dir) if model_dir is not None else None,
        "projector": model.config.projector_type,
        "visual_tokens": model.num_image_tokens,
        "projector_parameters": sum(parameter.numel() for parameter in model.projector.parameters()),
        # Wall time of generation per question, image loading included: a latency only when questions go one by one;
        # at larger batch sizes it is a throughput, kept apart so reports never mix the two.
        "latency_ms_per_sample": per_question if batch_size == 1 else None,
        "ms_per_question": per_question,
        "tokens_per_second": result.new_tokens / seconds if result.new_tokens and seconds > 0 else None,
        "generated_tokens": result.new_tokens,
        "questions_file": str(questions_file),
        "questions_sha256": file_digest(questions_file),
        "answers_file": str(result.answers_file),
        "answered": result.answered,
        "skipped": [str(found) for found in result.problems],
        "generation": {
            "template": result.template,
            "suffix": suffix,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
        },
    }


def read_answer_key(path: Path, questions: list[Question], problems: list[QuestionProblem]) -> list[dict[str, Any]]:
    """The key's records, each checked, after checking that it fits the question file.

    Every question needs a key entry; key entries without a question are allowed only as far as lines of the
    question file were skipped (their ids may be unknown), since otherwise the key belongs to another file.
    """
    key = read_jsonl(path)
    for index, record in enumerate(key):
        read_key_item(record, f"{path} record {index}")
    key_ids = {str(record["question_id"]) for record in key}
    question_ids = {str(question.question_id) for question in questions}
    missing = [str(question.question_id) for question in questions if str(question.question_id) not in key_ids]
    if missing:
        raise ValueError(f"{path}: no entry for {len(missing)} questions of the question file: {describe_ids(missing)}")
    extra = [question_id for question_id in key_ids if question_id not in question_ids]
    if len(extra) > len(problems):
        raise ValueError(
            f"{path}: {len(extra)} entries whose question is not in the question file "
            f"({describe_ids(sorted(extra))}); is it the key of another question file?"
        )
    return key


def check_pope_labels(path: Path, questions: list[Question]) -> None:
    for question in questions:
        pope_label(question.record, f"{path} line {question.line}")


def score_with_key(path: Path, key: list[dict[str, Any]], result: EvalResult) -> dict[str, Any]:
    answers = read_jsonl(result.answers_file)
    answered = {str(answer["question_id"]) for answer in answers}
    # Questions skipped above have no answer: they are left out of the score, and listed.
    unscored = sorted(str(record["question_id"]) for record in key if str(record["question_id"]) not in answered)
    scored_key = [record for record in key if str(record["question_id"]) in answered]
    scores = score_answers(answers, scored_key, str(result.answers_file), str(path))
    return {"benchmark": "answer_key", "answer_key": str(path), "unscored_questions": unscored, **scores}


def score_pope_run(questions_file: Path, result: EvalResult) -> dict[str, Any]:
    answers = read_jsonl(result.answers_file)
    pope = score_pope([q.record for q in result.questions], answers, str(questions_file), str(result.answers_file))
    # For the report, the POPE splits are the categories and accuracy the measure; F1 stays in "pope".
    return {
        "benchmark": "pope",
        "overall": pope["mean"]["accuracy"],
        "categories": {split: metrics["accuracy"] for split, metrics in pope["splits"].items()},
        "pope": pope,
    }


__all__ = [
    "SCORES_SUFFIX",
    "EvalPlan",
    "Evaluation",
    "evaluate",
    "plan_evaluation",
    "default_run_name",
    "evaluate_questions",
    "read_answer_key",
    "run_facts",
    "scores_path",
]
