"""Checking a LLaVA JSON file before training: every problem of every record, found up front.

Runs the structural scan of LlavaDataset, decodes every image fully, and with a processor also renders each record
with its template, tokenises it and verifies its labels (and fits it to max_length if given).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..model.conversation import LabelMismatchError, TemplateError
from ..model.processing import SpatialMLLMProcessor
from .dataset import DataError, DataProblem, Overlong, ProblemKind, Record, fit_length, load_images, scan_file


@dataclass
class DataCheck:
    """What `check_file` found: every problem in record order, and how many records were read."""

    file: str
    records: int
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.file}: {self.records} records, no problems"
        counts = Counter(str(p.kind) for p in self.problems)
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items()))
        bad = len({p.index for p in self.problems})
        return f"{self.file}: {len(self.problems)} problem(s) in {bad} of {self.records} record(s) ({kinds})"


def check_file(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    processor: SpatialMLLMProcessor | None = None,
    max_length: int | None = None,
    overlong: Overlong = "truncate",
    progress: bool = False,
) -> DataCheck:
    """All problems of the file. Without a processor only the records and images are checked; with one, each
    record is also rendered by its template, tokenised and label-verified (and fitted to max_length)."""
    if max_length is not None and processor is None:
        raise ValueError("checking max_length needs a processor (image tokens count towards the length)")
    file = os.fspath(json_path)
    folder = Path(image_folder) if image_folder is not None else Path(json_path).parent
    check = processor.check_conversation if processor is not None else None
    records, problems = scan_file(json_path, folder, check, strict=False)
    total = len(records) + len(problems)  # the scan reports one problem per record it rejects
    for record in tqdm(records, desc="checking records", unit="rec", disable=not progress):
        problems += _image_problems(record, folder, file)
        if processor is not None:
            problems += _text_problems(record, file, processor, max_length, overlong)
    return DataCheck(file, total, sorted(problems, key=lambda p: p.index))


def processor_for_checks(
    model_dir: str | os.PathLike | None,
    tokenizer_dir: str | os.PathLike | None,
    template: str | None = None,
    num_image_tokens: int = 1,
) -> tuple[SpatialMLLMProcessor, str | None]:
    """The processor that checks text: a model folder's own (its template unless `template` is given), or one made
    around a tokenizer folder (template default vicuna_v1). Also a note when the tokenizer lacked `<image>`."""
    if model_dir is not None:
        processor = SpatialMLLMProcessor.from_pretrained(model_dir)
        if template is not None:
            processor.use_template(template)
        return processor, None
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from ..hub import resolve_source
    from ..model.builder import add_image_token
    from ..model.configuration import IMAGE_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(str(tokenizer_dir), "--tokenizer"))
    note = None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        note = f"the tokenizer has no {IMAGE_TOKEN} token; added it for this check, as model building does"
    add_image_token(tokenizer)
    # Checking never transforms pixels (images are only decoded), so any image processor fits here.
    processor = SpatialMLLMProcessor(CLIPImageProcessorPil(), tokenizer, num_image_tokens, chat_template=template or "vicuna_v1")
    return processor, note


def _image_problems(record: Record, folder: Path, file: str) -> list[DataProblem]:
    try:
        load_images(record, folder, file)
    except DataError as err:
        return [err.problem]
    return []


def _text_problems(
    record: Record, file: str, processor: SpatialMLLMProcessor, max_length: int | None, overlong: Overlong
) -> list[DataProblem]:
    name = f"{file} record {record.index}"
    try:
        encoded = processor.encode_conversation(record.messages, name=name)
    except (TemplateError, LabelMismatchError) as err:
        kind = ProblemKind.TEMPLATE if isinstance(err, TemplateError) else ProblemKind.LABEL_MISMATCH
        return [DataProblem(file, record.index, "conversations", _reason(err, name), kind)]
    if max_length is None:
        return []
    fitted = fit_length(encoded.input_ids, encoded.labels, processor.image_token_id, max_length, overlong)
    if isinstance(fitted, str):
        return [DataProblem(file, record.index, "conversations", fitted, ProblemKind.OVERLONG)]
    return []


def _reason(err: Exception, name: str) -> str:
    """The error message without its leading record name (DataProblem prints the place itself)."""
    message = str(err)
    return message[len(name) + 2 :] if message.startswith(f"{name}: ") else message


__all__ = ["DataCheck", "check_file", "processor_for_checks"]
