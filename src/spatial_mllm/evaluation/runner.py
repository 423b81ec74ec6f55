"""Batched greedy generation over a LLaVA evaluation question file, answers in LLaVA's JSONL format.

Deterministic: questions are answered in file order, greedy, with left padding; the answer id is derived from the
model and question ids, so the same model and file give the same answers file whatever the batch size.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..data.templates import ConversationEncoder, Message

RUN_INFO_FILE = "spatial_mllm_run.json"  # written beside a trained model: template and prompt conventions


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


@dataclass
class EvalResult:
    answers_file: Path
    answered: int
    problems: list[QuestionProblem] = field(default_factory=list)
    seconds: float = 0.0
    new_tokens: int = 0


def read_questions(path: Path, image_folder: Path | None, strict: bool) -> tuple[list[Question], list[QuestionProblem]]:
    """Reads every line; a broken line or missing image is reported with its line and skipped (or raised if strict)."""
    questions, problems = [], []

    def problem(line: int, field_name: str, message: str) -> None:
        found = QuestionProblem(str(path), line, field_name, message)
        if strict:
            raise ValueError(str(found))
        problems.append(found)

    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem(line_number, "<line>", f"not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                problem(line_number, "<line>", f"expected a JSON object, got {type(record).__name__}")
                continue
            if "question_id" not in record:
                problem(line_number, "question_id", "missing")
                continue
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                problem(line_number, "text", "missing or empty")
                continue
            image = record.get("image")
            if image is not None:
                if image_folder is None:
                    problem(line_number, "image", "the question has an image but no image folder was given")
                    continue
                if not (image_folder / image).is_file():
                    problem(line_number, "image", f"file not found: {image_folder / image}")
                    continue
            questions.append(Question(record["question_id"], text, image, record.get("category"), line_number))
    return questions, problems


def run_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / RUN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def answer_id(model_id: str, question_id: Any) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}").hex


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    questions: list[Question],
    image_folder: Path | None,
    template: str,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    suffix: str = "",
    progress: bool = True,
) -> tuple[list[str], list[str], int]:
    """Greedy answers (and the prompts used) for each question, in order."""
    tokenizer = processor.tokenizer
    encoder = ConversationEncoder(tokenizer, template, processor.num_image_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers, prompts, new_tokens = [], [], 0
    bar = tqdm(total=len(questions), desc="eval", unit="q", disable=not progress)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        rows, pictures = [], []
        for q in chunk:
            text = q.text + (("\n" + suffix) if suffix else "")
            content = f"<image>\n{text}" if q.image is not None else text
            prompts.append(content)
            rows.append(encoder.encode_prompt([Message("user", content)]))
            if q.image is not None:
                with Image.open(image_folder / q.image) as im:
                    pictures.append(im.convert("RGB"))
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])  # left padding
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        pixel_values = processor.preprocess_images(pictures).to(model.device) if pictures else None
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        generated = output[:, width:]
        for row in generated:
            kept = row[row != pad_id] if pad_id != tokenizer.eos_token_id else row
            new_tokens += int((row != pad_id).sum())
            answers.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
        bar.update(len(chunk))
    bar.close()
    return answers, prompts, new_tokens


def evaluate_file(
    model_dir: str | Path,
    questions_file: str | Path,
    image_folder: str | Path | None,
    out_file: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str | None = None,
    suffix: str = "",
    strict: bool = False,
    model=None,
    processor=None,
    progress: bool = True,
) -> EvalResult:
    """Answers a question file and writes the answers JSONL; `model`/`processor` may be passed already loaded."""
    from .loading import load_for_inference

    model_dir = Path(model_dir)
    if model is None:
        model, processor = load_for_inference(model_dir)
    info = run_info(model_dir)
    template = template or info.get("template", "vicuna_v1")
    folder = Path(image_folder) if image_folder is not None else None
    questions, problems = read_questions(Path(questions_file), folder, strict)
    started = time.perf_counter()
    answers, prompts, new_tokens = generate_answers(
        model, processor, questions, folder, template, batch_size, max_new_tokens, suffix, progress
    )
    seconds = time.perf_counter() - started
    model_id = info.get("model_id", model_dir.name)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(out_file.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for q, prompt, text in zip(questions, prompts, answers):
            record = {
                "question_id": q.question_id,
                "prompt": prompt,
                "text": text,
                "answer_id": answer_id(model_id, q.question_id),
                "model_id": model_id,
                "metadata": {"template": template, "suffix": suffix, "category": q.category},
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out_file)
    for found in problems:
        print(f"skipped: {found}")
    return EvalResult(out_file, len(questions), problems, seconds, new_tokens)


__all__ = ["EvalResult", "Question", "QuestionProblem", "RUN_INFO_FILE", "evaluate_file", "generate_answers", "read_questions"]
