"""`spatial-mllm eval` (answer a question file, then score it), `spatial-mllm report` (compare scored runs) and
`spatial-mllm image-reliance` (does the model read the image at all?).

`eval` writes the answers JSONL at --out and, beside it, a scores JSON (OUT with suffix .scores.json) holding the
run's facts (name, projector, visual tokens, projector parameters, latency, tokens/s) with the scores, so that
`report --runs` takes those files as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data.templates import TEMPLATES
from .loading import load_for_inference
from .metrics import read_key_item, score_answers
from .pope import score_pope
from .records import describe_ids, read_jsonl
from .report import markdown_table, read_run, read_runs, write_report
from .runner import EvalResult, Question, QuestionProblem, evaluate_file, read_questions

SCORES_SUFFIX = ".scores.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_eval(subparsers)
    _register_report(subparsers)
    _register_image_reliance(subparsers)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="answer an evaluation question file with a trained model, then score it",
        description=(
            "Answer a LLaVA question JSONL greedily in batches and write LLaVA's answers JSONL. With --answer-key "
            "(the built-in world's key) or --pope (labels in the question file) the answers are scored; the scores "
            f"and the run's facts go to OUT with suffix {SCORES_SUFFIX}. Lines that cannot be answered are reported "
            "with their file and line and skipped, unless --strict."
        ),
    )
    parser.add_argument("--model", required=True, type=Path, help="trained model folder (config.json, weights)")
    parser.add_argument("--questions", required=True, type=Path, help="question JSONL: question_id, image, text")
    parser.add_argument("--images", type=Path, help="folder the questions' image paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="answers JSONL to write")
    scoring = parser.add_mutually_exclusive_group()
    scoring.add_argument("--answer-key", type=Path, help="answer-key JSONL to score against (built-in world)")
    scoring.add_argument("--pope", action="store_true", help="score as POPE: labels and splits are in --questions")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generation batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest answer in tokens (default 16)")
    parser.add_argument(
        "--template",
        choices=TEMPLATES.names(),
        help="conversation template (default: the one the model was trained with, else vicuna_v1)",
    )
    parser.add_argument("--suffix", default="", help="text added on a new line after each question")
    parser.add_argument("--strict", action="store_true", help="stop at the first line that cannot be answered")
    parser.add_argument(
        "--name", help="run name in scores and reports (default: the model folder and its parent, e.g. saep/stage2)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_eval)


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare scored runs: Markdown table, JSON summary, plots",
        description=f"Write report.md, report.json and two PNG plots from the {SCORES_SUFFIX} files of `eval`.",
    )
    parser.add_argument("--runs", required=True, nargs="+", type=Path, help=f"{SCORES_SUFFIX} files, one per run")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report")
    parser.add_argument(
        "--mixed-questions",
        action="store_true",
        help="allow runs scored on different question files (by default refused: their numbers do not compare)",
    )
    parser.set_defaults(func=_report)


def _register_image_reliance(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "image-reliance",
        help="loss with each sample's own image vs another sample's: does the model read the image?",
        description=(
            "Score the supervised tokens of a LLaVA JSON file (e.g. a held-out part of the training data) twice: with "
            "each sample's own image, and with the image of the next image-bearing sample. Prints both losses per "
            "token and their gap with its standard error; a model that ignores the image has a gap of 0. Broken "
            "records are reported and skipped, unless --strict."
        ),
    )
    parser.add_argument("--model", required=True, type=Path, help="trained model folder (config.json, weights)")
    parser.add_argument("--data", required=True, type=Path, help="LLaVA JSON: id, image, conversations")
    parser.add_argument("--images", required=True, type=Path, help="folder the records' image paths are relative to")
    parser.add_argument(
        "--template",
        choices=TEMPLATES.names(),
        help="conversation template (default: the one the model was trained with, else vicuna_v1)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens (default 2048)")
    parser.add_argument("--strict", action="store_true", help="stop at the first broken record")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.set_defaults(func=_image_reliance)


# --- eval ---------------------------------------------------------------------------------------------------------


def scores_path(answers_file: Path) -> Path:
    """answers.jsonl -> answers.scores.json, beside it."""
    return answers_file.with_suffix(SCORES_SUFFIX)


def _eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be at least 1")
    # Everything that can be checked without the model is checked first, so a bad file fails in seconds, not
    # after the generation; this reading prints nothing, evaluate_file reports the skipped lines.
    questions, problems = read_questions(args.questions, args.images, args.strict)
    if not questions:
        first = f"; the first: {problems[0]}" if problems else ""
        raise ValueError(f"{args.questions}: no question can be answered ({len(problems)} lines skipped{first})")
    key = _read_answer_key(args.answer_key, questions, problems) if args.answer_key else None
    if args.pope:
        _check_pope_labels(args.questions, questions)

    model, processor = load_for_inference(args.model)
    result = evaluate_file(
        args.model,
        args.questions,
        args.images,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        suffix=args.suffix,
        strict=args.strict,
        model=model,
        processor=processor,
        progress=not args.quiet,
    )
    scores = run_facts(args, model, result)
    if key is not None:
        scores.update(_score_with_key(args.answer_key, key, result))
    elif args.pope:
        scores.update(_score_pope_run(args.questions, result))
    path = scores_path(args.out)
    path.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"{result.answered} questions answered, {len(result.problems)} lines skipped; answers: {args.out}")
    print(f"scores and run facts: {path}")
    if key is not None:
        print(key_table(scores))
    elif args.pope:
        print(pope_table(scores["pope"]))
    return 0


def default_run_name(model_dir: Path) -> str:
    """The model folder with its parent (runs/demo/saep/stage2 -> saep/stage2): training writes stage folders of
    the same name for every projector, and report needs names that differ."""
    folder = model_dir.resolve()
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_facts(args: argparse.Namespace, model, result: EvalResult) -> dict[str, Any]:
    """What `report` needs besides the scores, measured on this run."""
    seconds = result.seconds
    per_question = 1000 * seconds / result.answered if result.answered and seconds > 0 else None
    return {
        "name": args.name or default_run_name(args.model),
        "model": str(args.model),
        "projector": model.config.projector_type,
        "visual_tokens": model.num_image_tokens,
        "projector_parameters": sum(parameter.numel() for parameter in model.projector.parameters()),
        # Wall time of generation per question, image loading included: a latency only when questions go one by one;
        # at larger batch sizes it is a throughput, kept apart so reports never mix the two.
        "latency_ms_per_sample": per_question if args.batch_size == 1 else None,
        "ms_per_question": per_question,
        "tokens_per_second": result.new_tokens / seconds if result.new_tokens and seconds > 0 else None,
        "generated_tokens": result.new_tokens,
        "questions_file": str(args.questions),
        "questions_sha256": file_digest(args.questions),
        "answers_file": str(args.out),
        "answered": result.answered,
        "skipped": [str(found) for found in result.problems],
        "generation": {
            "template": result.template,
            "suffix": args.suffix,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy",
        },
    }


def _read_answer_key(
    path: Path, questions: list[Question], problems: list[QuestionProblem]
) -> list[dict[str, Any]]:
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


def _score_with_key(path: Path, key: list[dict[str, Any]], result: EvalResult) -> dict[str, Any]:
    answers = read_jsonl(result.answers_file)
    answered = {str(answer["question_id"]) for answer in answers}
    # Questions skipped above have no answer: they are left out of the score, and listed.
    unscored = sorted(str(record["question_id"]) for record in key if str(record["question_id"]) not in answered)
    scored_key = [record for record in key if str(record["question_id"]) in answered]
    scores = score_answers(answers, scored_key, str(result.answers_file), str(path))
    return {"benchmark": "answer_key", "answer_key": str(path), "unscored_questions": unscored, **scores}


def _check_pope_labels(path: Path, questions: list[Question]) -> None:
    for question in questions:
        where = f"{path} line {question.line}"
        label = question.record.get("label")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise ValueError(f"{where}: field 'label' must be 'yes' or 'no' for POPE, got {label!r}")
        if not isinstance(question.category, str) or not question.category:
            raise ValueError(f"{where}: field 'category' (the POPE split) must be a non-empty string")


def _score_pope_run(questions_file: Path, result: EvalResult) -> dict[str, Any]:
    answers = read_jsonl(result.answers_file)
    pope = score_pope([q.record for q in result.questions], answers, str(questions_file), str(result.answers_file))
    # For the report, the POPE splits are the categories and accuracy the measure; F1 stays in "pope".
    return {
        "benchmark": "pope",
        "overall": pope["mean"]["accuracy"],
        "categories": {split: metrics["accuracy"] for split, metrics in pope["splits"].items()},
        "pope": pope,
    }


def key_table(scores: Mapping[str, Any]) -> str:
    counts = scores["counts"]
    rows = [(name, accuracy, counts["categories"][name]) for name, accuracy in scores["categories"].items()]
    rows.append(("overall", scores["overall"], counts["overall"]))
    width = max(len("category"), *(len(name) for name, _, _ in rows))
    lines = [f"{'category':<{width}}  accuracy  correct/total"]
    for name, accuracy, tally in rows:
        lines.append(f"{name:<{width}}  {accuracy * 100:7.1f}%  {tally['correct']:>6}/{tally['total']}")
    return "\n".join(lines)


def pope_table(pope: Mapping[str, Any]) -> str:
    columns = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    rows = [*pope["splits"].items(), ("mean", pope["mean"])]
    width = max(len("split"), *(len(name) for name, _ in rows))
    lines = [f"{'split':<{width}}  " + "  ".join(f"{column:>9}" for column in columns)]
    for name, metrics in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metrics[column] * 100:8.1f}%" for column in columns))
    return "\n".join(lines)


# --- report -------------------------------------------------------------------------------------------------------


def _check_comparable(results: list[dict[str, Any]], paths: list[Path], mixed_questions: bool) -> None:
    """Runs in one table must be scored the same way on the same questions, or their numbers do not compare."""
    first, first_path = results[0], paths[0]
    for result, path in zip(results[1:], paths[1:]):
        if result.get("benchmark") != first.get("benchmark"):
            raise ValueError(
                f"{path} is scored as {result.get('benchmark')!r} but {first_path} as {first.get('benchmark')!r}; "
                "report runs of one benchmark together"
            )
        digests = (result.get("questions_sha256"), first.get("questions_sha256"))
        if not mixed_questions and None not in digests and digests[0] != digests[1]:
            raise ValueError(
                f"{path} answered {result.get('questions_file')} but {first_path} answered {first.get('questions_file')}, "
                "a different question file; compare runs on the same questions (or pass --mixed-questions)"
            )


def _report(args: argparse.Namespace) -> int:
    results, first_file_of = [], {}
    for path in args.runs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such scores file")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(result, dict) and "answers_file" in result and "benchmark" not in result:
            raise ValueError(
                f"{path}: answers without scores (eval ran without --answer-key or --pope); run eval again with one"
            )
        name = read_run(result, str(path)).name  # checks the run, errors name the file
        if name in first_file_of:
            raise ValueError(
                f"{path}: run name {name!r} is also the name in {first_file_of[name]}; names must differ "
                "(give each run its own with spatial-mllm eval --name)"
            )
        first_file_of[name] = path
        results.append(result)
    _check_comparable(results, list(args.runs), args.mixed_questions)
    paths = write_report(results, args.out)
    print(markdown_table(read_runs(results)))
    print("report written: " + ", ".join(str(path) for path in paths.values()))
    return 0


# --- image-reliance -----------------------------------------------------------------------------------------------


def _image_reliance(args: argparse.Namespace) -> int:
    from ..data.dataset import LlavaDataset
    from ..training.engine import ImageTransform, make_collator
    from .image_reliance import image_reliance
    from .runner import trained_template

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    model, processor = load_for_inference(args.model)
    template = args.template or trained_template(args.model)
    dataset = LlavaDataset(args.data, args.images, processor.tokenizer, template, processor.num_image_tokens,
                           ImageTransform(processor), args.max_length, "drop", args.strict)  # fmt: skip
    result = image_reliance(model, dataset, make_collator(processor), args.batch_size)
    if dataset.problems:
        print(dataset.report(), file=sys.stderr)
    print(
        f"{result.samples} samples with images, {result.supervised_tokens} supervised tokens, template {template}\n"
        f"loss per token with their own images {result.loss_own_images:.4f}, with other images "
        f"{result.loss_other_images:.4f}; gap {result.gap:.4f} ± {result.gap_standard_error:.4f}"
    )
    if args.out is not None:
        facts = {"model": str(args.model), "data": str(args.data), "template": template, "skipped": len(dataset.problems)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(facts | result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
