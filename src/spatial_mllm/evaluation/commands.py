"""`spatial-mllm eval` (answer a question file, then score it), `spatial-mllm report` (compare scored runs) and
`spatial-mllm image-reliance` (does the model read the image at all?): argument parsing and printing only; the
work is done by `evaluate.plan_evaluation` / `evaluate`, `comparison.compare_runs` with `report.write_report`, and
`image_reliance`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..model.chat_templates import template_names
from ..model.loading import load_for_inference
from .arms import DEFAULT_BASELINE
from .comparison import compare_runs
from .evaluate import SCORES_SUFFIX, evaluate, plan_evaluation
from .report import accuracy_table, write_report
from .runner import partial_path
from .runs import read_scores_file
from .text_ceiling import read_text_ceiling


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
        choices=template_names(),
        help="conversation template (default: the model processor's own, the one it was trained with)",
    )
    parser.add_argument("--suffix", default="", help="text added on a new line after each question")
    parser.add_argument("--strict", action="store_true", help="stop at the first line that cannot be answered")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing answers file and its scores")
    parser.add_argument(
        "--name", help="run name in scores and reports (default: the model folder and its parent, e.g. saep/stage2)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_eval)


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare scored runs: accuracies with 95% intervals, paired tests, Markdown, JSON, plots",
        description=(
            f"Compare the {SCORES_SUFFIX} files of `eval`: accuracies with 95% intervals, each projector against the "
            "baseline and the blind control question by question (exact McNemar, Holm-corrected), a best projector "
            "only when significant, accuracy by image region, the spread across seeds (runs with an 'arm' and a "
            "'seed'), and the LLaVA-SP and SAEP claims as measured. Writes report.md, report.json and PNG plots."
        ),
    )
    parser.add_argument("--runs", required=True, nargs="+", type=Path, help=f"{SCORES_SUFFIX} files, one per run")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report")
    parser.add_argument(
        "--baseline", help=f"the run (name or arm) or projector the others are tested against (default {DEFAULT_BASELINE})"
    )
    parser.add_argument(
        "--blind", nargs="+", type=Path, default=[],
        help=f"{SCORES_SUFFIX} files of the blind control (the same recipe with every image replaced by another "
        "sample's), one per seed",
    )  # fmt: skip
    parser.add_argument("--text-ceiling", type=Path, help="JSON of the LLM's text-only accuracy with the scene description")
    parser.add_argument(
        "--mixed-questions",
        action="store_true",
        help="allow runs scored on different questions (other file or subset): counts shown, no ranking or paired tests",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the report files already in --out")
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
        choices=template_names(),
        help="conversation template (default: the model processor's own, the one it was trained with)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens (default 2048)")
    parser.add_argument("--strict", action="store_true", help="stop at the first broken record")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.set_defaults(func=_image_reliance)


# --- eval ---------------------------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be at least 1")
    # Files first: a bad question file, key or output fails in seconds, before the model loads.
    plan = plan_evaluation(
        args.questions, args.images, args.out, answer_key=args.answer_key, pope=args.pope, name=args.name,
        model_dir=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, suffix=args.suffix,
        strict=args.strict, overwrite=args.overwrite,
    )
    model, processor = load_for_inference(args.model)
    if args.template:
        processor.use_template(args.template)
    try:
        evaluation = evaluate(model, processor, plan, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; the answers so far are kept in {partial_path(plan.out_file)}", file=sys.stderr)
        return 130
    for found in evaluation.skipped:
        print(f"skipped: {found}", file=sys.stderr)
    print(f"{evaluation.answered} questions answered, {len(evaluation.skipped)} lines skipped; answers: {args.out}")
    print(f"scores and run facts: {evaluation.scores_file}")
    if evaluation.benchmark == "answer_key":
        print(key_table(evaluation.scores))
    elif evaluation.benchmark == "pope":
        print(pope_table(evaluation.scores["pope"]))
    return 0


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


def _report(args: argparse.Namespace) -> int:
    paths = [*args.runs, *args.blind]
    results = [read_scores_file(path) for path in args.runs]
    for path in args.blind:  # several files are seeds of one blind control, unless they name their arm
        blind = read_scores_file(path)
        shared_arm = {"arm": blind.get("arm") or "blind control"} if len(args.blind) > 1 else {}
        results.append({**blind, "control": "blind", **shared_arm})
    comparison = compare_runs(
        results,
        sources=[str(path) for path in paths],
        baseline=args.baseline,
        text_ceiling=read_text_ceiling(args.text_ceiling) if args.text_ceiling else None,
        allow_mixed_questions=args.mixed_questions,
    )
    written = write_report(comparison, args.out, overwrite=args.overwrite)
    print(accuracy_table(comparison, "groups"))
    print(f"best overall: {comparison.ranking.best or '—'} ({comparison.ranking.reason})")
    for claim in comparison.claims:
        print(f"{claim.paper}{f' ({claim.arm})' if claim.arm else ''}: {claim.finding}")
    print("report written: " + ", ".join(str(path) for path in written.values()))
    return 0


# --- image-reliance -----------------------------------------------------------------------------------------------


def _image_reliance(args: argparse.Namespace) -> int:
    from ..data.dataset import LlavaDataset
    from ..training.engine import make_collator
    from .image_reliance import image_reliance

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    model, processor = load_for_inference(args.model)
    if args.template:
        processor.use_template(args.template)
    dataset = LlavaDataset(args.data, args.images, processor, args.max_length, "drop", args.strict)
    result = image_reliance(model, dataset, make_collator(processor), args.batch_size)
    if dataset.problems:
        print(dataset.report(), file=sys.stderr)
    print(
        f"{result.samples} samples with images, {result.supervised_tokens} supervised tokens, template {processor.template}\n"
        f"loss per token with their own images {result.loss_own_images:.4f}, with other images "
        f"{result.loss_other_images:.4f}; gap {result.gap:.4f} ± {result.gap_standard_error:.4f}"
    )
    if args.out is not None:
        facts = {"model": str(args.model), "data": str(args.data), "template": processor.template,
                 "skipped": len(dataset.problems)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(facts | result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
