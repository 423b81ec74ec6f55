"""`spatial-mllm data check`: every problem of a LLaVA JSON file, found before training instead of during it.

Runs the structural scan of LlavaDataset, decodes every image fully, and with a tokenizer also renders each record
with the template, tokenises it and verifies its labels (and fits it to --max-length if given).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .dataset import DataError, DataProblem, Overlong, ProblemKind, Record, fit_length, load_images, scan_file
from .templates import (
    IMAGE_TOKEN,
    TEMPLATES,
    ConversationEncoder,
    ConversationTemplate,
    LabelMismatchError,
    TemplateError,
    get_template,
)


def check_file(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: str | ConversationTemplate = "vicuna_v1",
    num_image_tokens: int | None = None,
    max_length: int | None = None,
    overlong: Overlong = "truncate",
    progress: bool = False,
) -> list[DataProblem]:
    """All problems of the file, in record order. Without a tokenizer only the records and images are checked.

    max_length needs num_image_tokens (the model's tokens per image), as image tokens count towards the length.
    """
    if max_length is not None and num_image_tokens is None:
        raise ValueError("checking max_length needs num_image_tokens (the number of tokens the model uses per image)")
    file = os.fspath(json_path)
    folder = Path(image_folder) if image_folder is not None else Path(json_path).parent
    conversation_template = get_template(template) if isinstance(template, str) else template
    encoder = None
    if tokenizer is not None:
        encoder = ConversationEncoder(tokenizer, conversation_template, num_image_tokens or 1)
    records, problems = scan_file(json_path, folder, conversation_template, strict=False)
    for record in tqdm(records, desc="checking records", unit="rec", disable=not progress):
        problems += _image_problems(record, folder, file)
        if encoder is not None:
            problems += _text_problems(record, file, encoder, max_length, overlong)
    return sorted(problems, key=lambda p: p.index)


def _image_problems(record: Record, folder: Path, file: str) -> list[DataProblem]:
    try:
        load_images(record, folder, file)
    except DataError as err:
        return [err.problem]
    return []


def _text_problems(
    record: Record, file: str, encoder: ConversationEncoder, max_length: int | None, overlong: Overlong
) -> list[DataProblem]:
    name = f"{file} record {record.index}"
    try:
        encoded = encoder.encode(record.messages, name)
    except (TemplateError, LabelMismatchError) as err:
        kind = ProblemKind.TEMPLATE if isinstance(err, TemplateError) else ProblemKind.LABEL_MISMATCH
        return [DataProblem(file, record.index, "conversations", _reason(err, name), kind)]
    if max_length is None:
        return []
    fitted = fit_length(encoded.input_ids, encoded.labels, encoder.image_token_id, max_length, overlong)
    if isinstance(fitted, str):
        return [DataProblem(file, record.index, "conversations", fitted, ProblemKind.OVERLONG)]
    return []


def _reason(err: Exception, name: str) -> str:
    """The error message without its leading record name (DataProblem prints the place itself)."""
    message = str(err)
    return message[len(name) + 2 :] if message.startswith(f"{name}: ") else message


def summarize(problems: list[DataProblem]) -> str:
    counts = Counter(str(p.kind) for p in problems)
    records = len({p.index for p in problems})
    kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items()))
    return f"{len(problems)} problem(s) in {records} record(s) ({kinds})"


def register_check(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser("check", help="report every problem of a LLaVA JSON file without training")
    parser.add_argument("file", help="LLaVA JSON file (a list of records)")
    parser.add_argument("--images", help="image folder the records' paths are relative to (default: the file's folder)")
    parser.add_argument(
        "--tokenizer", help="tokenizer folder: also render, tokenise and verify the labels of each record"
    )
    parser.add_argument("--template", default="vicuna_v1", choices=TEMPLATES.names())
    parser.add_argument("--num-image-tokens", type=int, help="tokens per image of the model (needed by --max-length)")
    parser.add_argument("--max-length", type=int, help="also report records that cannot fit this many tokens")
    parser.add_argument("--overlong", choices=["truncate", "drop"], default="truncate")
    parser.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
            print(f"note: the tokenizer has no {IMAGE_TOKEN} token; added it for this check, as model building does")
    problems = check_file(
        args.file, args.images, tokenizer, args.template, args.num_image_tokens, args.max_length, args.overlong,
        progress=True,
    )
    for problem in problems:
        print(problem)
    if problems:
        print(summarize(problems))
        return 1
    print(f"{args.file}: no problems")
    return 0
