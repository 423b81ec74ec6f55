"""Batched greedy generation over a LLaVA evaluation question file, answers in LLaVA's JSONL format.

Questions are answered in file order, greedily, in left-padded batches; the answer id is derived from the model and
question ids. Padding is masked and each row's positions start at its first real token, so an answer does not depend
on which questions share its batch or on the batch size. The one residue is float rounding: matrix products round
differently for different batch shapes (about 1e-7 relative in fp32, more in bf16), which can change a greedy token
only where the two best logits are that close.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data.images import ImageProblem, check_image_file, open_image
from ..model.configuration import IMAGE_TOKEN
from .records import jsonl_lines


@dataclass
class QuestionProblem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line} field {self.field!r}: {self.message}"


@dataclass
class Question:
    question_id: Any
    text: str
    image: str | None
    category: str | None
    line: int
    record: dict[str, Any] = field(default_factory=dict)  # the whole JSON line (POPE labels, say)
    file: str = ""  # the question file, for problems found later (an image that does not decode)


@dataclass
class EvalResult:
    answers_file: Path
    answered: int
    problems: list[QuestionProblem] = field(default_factory=list)
    seconds: float = 0.0  # generation time, image loading and preprocessing included
    new_tokens: int = 0
    questions: list[Question] = field(default_factory=list)  # those answered, in file order
    template: str = ""


def read_questions(path: Path, image_folder: Path | None, strict: bool) -> tuple[list[Question], list[QuestionProblem]]:
    """Reads every line; a broken line or missing image is reported with its line and skipped (or raised if strict)."""
    questions: list[Question] = []
    problems: list[QuestionProblem] = []
    first_line_of: dict[str, int] = {}

    def problem(line: int, field_name: str, message: str) -> None:
        found = QuestionProblem(str(path), line, field_name, message)
        if strict:
            raise ValueError(str(found))
        problems.append(found)

    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    for line_number, record, broken in jsonl_lines(path):
        if broken is not None:
            problem(line_number, "<line>", broken)
            continue
        if record.get("question_id") is None:
            problem(line_number, "question_id", "missing")
            continue
        key = str(record["question_id"])
        if key in first_line_of:
            problem(line_number, "question_id", f"{key!r} is already used on line {first_line_of[key]}")
            continue
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            problem(line_number, "text", "missing or empty")
            continue
        if IMAGE_TOKEN in text:
            problem(line_number, "text", f"contains {IMAGE_TOKEN}; the runner places the image itself")
            continue
        image = record.get("image")
        if image is not None:
            if image_folder is None:
                problem(line_number, "image", "the question has an image but no image folder was given")
                continue
            unreadable = _unreadable_image(image_folder, image)
            if unreadable:
                problem(line_number, "image", unreadable)
                continue
        first_line_of[key] = line_number
        category = record.get("category")
        questions.append(Question(record["question_id"], text, image, category, line_number, record, str(path)))
    return questions, problems


def _unreadable_image(folder: Path, image: Any) -> str | None:
    """Why the question's image cannot be used, or None. Only the header is read here, so this stays cheap; the
    whole image is decoded when it is asked about (a truncated file is skipped then)."""
    if not isinstance(image, str) or not image:
        return f"must be a path relative to the image folder, got {image!r}"
    try:
        path = check_image_file(folder, image)
    except ImageProblem as found:
        return str(found).replace(f"file not found: {image} (looked in {folder})", f"file not found: {folder / image}")
    try:
        with Image.open(path):
            return None
    except Image.DecompressionBombError as err:
        return f"too large to decode: {path} ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"not a readable image: {path} ({err})"


def answer_id(model_id: str, question_id: Any) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}").hex


class StopOnStrings(StoppingCriteria):
    """Stops each row once its generated text contains one of that row's stop strings."""

    def __init__(self, tokenizer, stops: Sequence[Sequence[str]], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_width = prompt_width  # generated tokens start after the (left-padded) prompts

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        done = []
        for row, stops in zip(input_ids[:, self.prompt_width :].tolist(), self.stops):
            text = self.tokenizer.decode(row, skip_special_tokens=True) if stops else ""
            done.append(any(stop in text for stop in stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_batch(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    stop_strings: Sequence[Sequence[str]] | None = None,
) -> list[list[int]]:
    """Greedy continuation token ids of each rendered prompt, through its first end-of-sequence token, unpadded.

    `prompts` are texts from `processor.apply_chat_template` (with `<image>` placeholders); `images` are all the
    batch's images in placeholder order. The processor left-pads and masks; generation positions come from the mask.
    `stop_strings`: per prompt, texts that end its generation once they appear (the batch stops when every row has).
    """
    tokenizer = processor.tokenizer
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    inputs = processor(images=list(images) or None, text=list(prompts), padding=True, padding_side="left")
    width = inputs["input_ids"].shape[1]
    stopping_criteria = None
    if stop_strings and any(stop_strings):
        stopping_criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, width)])
    output = model.generate(
        **{key: value.to(model.device) for key, value in inputs.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        stopping_criteria=stopping_criteria,
    )
    continuations = []
    for row in output[:, width:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        else:  # a row stopped by `stopping_criteria` before the longest one is padded after its end
            while row and row[-1] == pad_id:
                row.pop()
        continuations.append(row)
    return continuations


def question_prompt(question: Question, suffix: str = "") -> str:
    """The user turn for a question: LLaVA's "<image>\\n" before the text, the prompt suffix after it."""
    text = question.text + (f"\n{suffix}" if suffix else "")
    return f"{IMAGE_TOKEN}\n{text}" if question.image is not None else text


@dataclass
class Answer:
    question: Question
    prompt: str  # the user turn asked (question, suffix, placeholder)
    text: str
    new_tokens: int


def generate_answers(
    model,
    processor,
    questions: list[Question],
    image_folder: Path | None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    suffix: str = "",
    strict: bool = False,
    progress: bool = True,
) -> Iterator[Answer | QuestionProblem]:
    """Greedy answers to the questions, in order, as they are generated; a question whose image cannot be decoded
    comes out as a QuestionProblem instead (raised as ValueError when `strict`). Prompts are the processor's chat
    template around each question."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = processor.tokenizer
    with tqdm(total=len(questions), desc="eval", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            chunk, pictures = [], []
            for question in questions[start : start + batch_size]:
                try:
                    pictures += [open_image(image_folder, question.image)] if question.image is not None else []
                except ImageProblem as found:
                    problem = QuestionProblem(question.file, question.line, "image", str(found))
                    if strict:
                        raise ValueError(str(problem)) from None
                    yield problem
                    continue
                chunk.append(question)
            if chunk:
                contents = [question_prompt(q, suffix) for q in chunk]
                rendered = [
                    processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
                    for content in contents
                ]
                continuations = generate_batch(model, processor, rendered, pictures, max_new_tokens)
                for question, content, continuation in zip(chunk, contents, continuations):
                    text = tokenizer.decode(continuation, skip_special_tokens=True).strip()
                    yield Answer(question, content, text, len(continuation))
            bar.update(len(questions[start : start + batch_size]))


def partial_path(out_file: Path) -> Path:
    """Where answers go while they are generated; what a stopped run leaves behind."""
    return out_file.with_name(out_file.name + ".partial")


def answer_questions(
    model,
    processor,
    questions: list[Question],
    image_folder: str | Path | None,
    out_file: str | Path,
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    suffix: str = "",
    strict: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Answers the questions into LLaVA's answers JSONL at `out_file`. Each batch's answers are appended to
    `<out_file>.partial` as they come, which becomes `out_file` when every question has been asked: a run stopped
    half-way keeps what it answered, and `out_file` never holds a partial run."""
    from ..files import publish

    folder = Path(image_folder) if image_folder is not None else None
    template = processor.template
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_file)
    answered: list[Question] = []
    problems: list[QuestionProblem] = []
    new_tokens = 0
    started = time.perf_counter()
    with partial.open("w", encoding="utf-8") as handle:
        for result in generate_answers(
            model, processor, questions, folder, batch_size, max_new_tokens, suffix, strict, progress
        ):
            if isinstance(result, QuestionProblem):
                problems.append(result)
                continue
            q = result.question
            record = {
                "question_id": q.question_id,
                "prompt": result.prompt,
                "text": result.text,
                "answer_id": answer_id(model_id, q.question_id),
                "model_id": model_id,
                "metadata": {"template": template, "suffix": suffix, "category": q.category},
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            answered.append(q)
            new_tokens += result.new_tokens
    seconds = time.perf_counter() - started
    publish(partial, out_file)
    return EvalResult(out_file, len(answered), problems, seconds, new_tokens, answered, template)


__all__ = [
    "Answer",
    "EvalResult",
    "Question",
    "StopOnStrings",
    "QuestionProblem",
    "answer_questions",
    "partial_path",
    "generate_answers",
    "generate_batch",
    "question_prompt",
    "read_questions",
]
