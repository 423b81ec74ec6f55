"""LLaVA JSON training data: record validation with precise problem reports, and a lazy torch Dataset.

A LLaVA file is a JSON list of records `{"id", "image"?, "conversations": [{"from", "value"}, ...]}`.

Roles: "human"/"user" are the user, "gpt"/"assistant" the assistant; "system" is accepted only as the first turn
(templates use it in place of their default system text). After it, turns must alternate user, assistant, ...,
starting with the user and ending with the assistant; anything else ("bing", "chatgpt", two user turns in a row,
a conversation that starts with the model) is reported, not silently repaired.

Images: "image" is a path (or a list of paths) relative to the image folder; the text must hold exactly as many
`<image>` placeholders, all in user turns. As in LLaVA, a turn's single placeholder is moved to the start of that
turn followed by "\\n" (the form released checkpoints were trained and are prompted with).

Problems are found in two passes. At construction the file is parsed and every record checked structurally, image
files must exist: the dataset's indices then cover only the records that passed. Decoding images and fitting the
length happen when a sample is loaded; a record that fails then is reported (logged at once, also from DataLoader
worker processes) and the next usable record is served in its place. `spatial-mllm data check` runs both passes
over a whole file up front. With strict=True the first problem raises DataError instead.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from ..model.configuration import IMAGE_TOKEN
from ..model.conversation import IGNORE_INDEX
from .images import ImageProblem, check_image_file, open_image

if TYPE_CHECKING:
    from ..model.processing import SpatialMLLMProcessor

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Overlong = Literal["truncate", "drop"]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
ConversationCheck = Callable[[list[Message]], "str | None"]  # why a template cannot render messages, or None


class ProblemKind(StrEnum):
    MALFORMED_RECORD = "malformed_record"
    MALFORMED_CONVERSATION = "malformed_conversation"
    UNKNOWN_ROLE = "unknown_role"
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"
    TEMPLATE = "template"
    BAD_IMAGE_PATH = "bad_image_path"
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    OVERLONG = "overlong"
    LABEL_MISMATCH = "label_mismatch"


@dataclass(frozen=True)
class DataProblem:
    file: str
    index: int
    field: str | None
    message: str
    kind: ProblemKind

    def __str__(self) -> str:
        where = f"{self.file} record {self.index}"
        if self.field is not None:
            where += f" field '{self.field}'"
        return f"{where}: {self.message}"


class DataError(ValueError):
    def __init__(self, problem: DataProblem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True)
class Record:
    """A record that passed the structural checks, in normalised form."""

    index: int
    id: Any
    images: tuple[str, ...]
    messages: tuple[Message, ...]

    def to_json(self) -> bytes:
        turns = [[m["role"], m["content"]] for m in self.messages]
        return json.dumps([self.index, self.id, list(self.images), turns]).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        index, record_id, images, turns = json.loads(data)
        return cls(index, record_id, tuple(images), tuple({"role": r, "content": c} for r, c in turns))


def read_records(json_path: str | os.PathLike) -> list[Any]:
    """The raw records of a LLaVA JSON file (a list), with clear errors for a missing or malformed file."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {json_path}")
    try:
        with path.open(encoding="utf-8") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{json_path}: not UTF-8 text: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, found a JSON {type(records).__name__}")
    return records


def normalize_record(
    raw: Any, index: int, file: str, image_folder: Path, check_conversation: ConversationCheck | None = None
) -> Record | DataProblem:
    """The record in normalised form, or its first problem (checks are cheap: no image is opened).

    check_conversation: the processor's `check_conversation`, reporting what its template cannot render."""

    def problem(field: str | None, message: str, kind: ProblemKind) -> DataProblem:
        return DataProblem(file, index, field, message, kind)

    if not isinstance(raw, dict):
        return problem(None, f"expected an object, found {type(raw).__name__}", ProblemKind.MALFORMED_RECORD)

    images = raw.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return problem("image", "must be a path or a list of paths", ProblemKind.MALFORMED_RECORD)

    conversation = raw.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        found = "nothing" if conversation is None else repr(conversation)[:60]
        message = f"must be a non-empty list of turns, found {found}"
        return problem("conversations", message, ProblemKind.MALFORMED_CONVERSATION)
    messages: list[Message] = []
    for i, turn in enumerate(conversation):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            return problem(field, "must be an object with 'from' and 'value'", ProblemKind.MALFORMED_CONVERSATION)
        if "from" not in turn:
            return problem(f"{field}.from", "missing", ProblemKind.MALFORMED_CONVERSATION)
        role = ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            message = f"unknown role {turn['from']!r} (known: {', '.join(ROLES)})"
            return problem(f"{field}.from", message, ProblemKind.UNKNOWN_ROLE)
        value = turn.get("value")
        if not isinstance(value, str):
            found = "nothing" if value is None else f"a {type(value).__name__}"
            return problem(f"{field}.value", f"must be a string, found {found}", ProblemKind.MALFORMED_CONVERSATION)
        if not value.strip():
            return problem(f"{field}.value", "is empty", ProblemKind.MALFORMED_CONVERSATION)
        messages.append({"role": role, "content": value})

    order_problem = _order_problem(messages)
    if order_problem is not None:
        return problem("conversations", order_problem, ProblemKind.MALFORMED_CONVERSATION)

    placeholders = 0
    for i, message in enumerate(messages):
        count = message["content"].count(IMAGE_TOKEN)
        field = f"conversations[{i}].value"
        if count and message["role"] != "user":
            message_text = f"{IMAGE_TOKEN} placeholder in a {message['role']} turn"
            return problem(field, message_text, ProblemKind.PLACEHOLDER_MISMATCH)
        if count and not images:
            return problem(field, f"{IMAGE_TOKEN} placeholder but no 'image'", ProblemKind.PLACEHOLDER_MISMATCH)
        placeholders += count
    if placeholders != len(images):
        message = f"{len(images)} image(s) given but the text has {placeholders} {IMAGE_TOKEN} placeholder(s)"
        return problem("image", message, ProblemKind.PLACEHOLDER_MISMATCH)

    if len(images) == 1:
        messages = [_image_first(m) if IMAGE_TOKEN in m["content"] else m for m in messages]
    template_problem = check_conversation(messages) if check_conversation is not None else None
    if template_problem is not None:
        return problem("conversations", template_problem, ProblemKind.TEMPLATE)

    for image in images:
        try:
            check_image_file(image_folder, image)
        except ImageProblem as found:
            return problem("image", str(found), ProblemKind(found.kind))

    return Record(index, raw.get("id", index), tuple(images), tuple(messages))


def _order_problem(messages: list[Message]) -> str | None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        return "has no user or assistant turn"
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + len(messages) - len(turns)
            return f"turn {position} is {message['role']!r} where {expected!r} was expected (user and assistant alternate)"
    if turns[-1]["role"] != "assistant":
        return "ends with a user turn; the last turn must be the assistant's answer"
    return None


def _image_first(message: Message) -> Message:
    rest = message["content"].replace(IMAGE_TOKEN, "").strip()
    return {"role": message["role"], "content": f"{IMAGE_TOKEN}\n{rest}" if rest else IMAGE_TOKEN}


def scan_file(
    json_path: str | os.PathLike, image_folder: Path, check_conversation: ConversationCheck | None, strict: bool
) -> tuple[list[Record], list[DataProblem]]:
    """All records that pass the cheap checks, and the problems of the others (strict: raise at the first)."""
    file = os.fspath(json_path)
    records: list[Record] = []
    problems: list[DataProblem] = []
    for index, raw in enumerate(read_records(json_path)):
        result = normalize_record(raw, index, file, image_folder, check_conversation)
        if isinstance(result, Record):
            records.append(result)
        elif strict:
            raise DataError(result)
        else:
            problems.append(result)
    return records, problems


def load_images(record: Record, image_folder: Path, file: str) -> list[Image.Image]:
    """Fully decoded RGB images of a record; DataError naming the record if one cannot be used."""
    images = []
    for relative in record.images:
        try:
            images.append(open_image(image_folder, relative))
        except ImageProblem as found:
            raise DataError(DataProblem(file, record.index, "image", str(found), ProblemKind(found.kind))) from None
    return images


def fit_length(
    input_ids: list[int], labels: list[int], image_token_id: int, max_length: int, overlong: Overlong
) -> tuple[list[int], list[int]] | str:
    """The sample within max_length tokens, or why it cannot be: over the limit with overlong="drop", an image block
    that would be cut (image tokens are never cut), or no supervised token left after truncation."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    if overlong == "drop":
        return f"{len(input_ids)} tokens, more than max_length {max_length}"
    last_image = max((i for i, t in enumerate(input_ids) if t == image_token_id), default=-1)
    if last_image >= max_length:
        return f"{len(input_ids)} tokens and the image tokens end at {last_image + 1}, beyond max_length {max_length}"
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return f"{len(input_ids)} tokens; truncated to max_length {max_length} no supervised token is left"
    return input_ids[:max_length], labels


class LlavaDataset(Dataset):
    """Samples of a LLaVA JSON file: dict(input_ids, labels, pixel_values, id, images), made by the model's processor.

    pixel_values is (num_images, 3, H, W) from `processor.image_transform`, or None for a record without image, and
    for every record when `load_images` is False (images served otherwise, e.g. as cached ViT features: files are
    not opened, input_ids still hold the image tokens). image_folder None means the folder of the JSON file.
    Problems are in `problems`; `report()` sums them.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        processor: SpatialMLLMProcessor,
        max_length: int = 2048,
        overlong: Overlong = "truncate",
        strict: bool = False,
        load_images: bool = True,
    ):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.file = os.fspath(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else Path(json_path).parent
        self.processor = processor
        self.load_images = load_images
        self.max_length = max_length
        self.overlong = overlong
        self.strict = strict
        processor.encoder  # the template and tokenizer must fit before the file is read
        records, self.problems = scan_file(json_path, self.image_folder, processor.check_conversation, strict)
        self.num_records = len(records) + len(self.problems)
        # One bytes blob + offsets instead of a list of Python objects: DataLoader workers share it without
        # copy-on-write growth (reading a Python object touches its refcount and copies its memory page).
        blobs = [record.to_json() for record in records]
        self._blob = b"".join(blobs)
        self._offsets = array("q", [0])
        for blob in blobs:
            self._offsets.append(self._offsets[-1] + len(blob))
        # Approximate token counts (words, plus the image tokens), for length-grouped batches: cheap, no tokenising.
        num_image_tokens = processor.num_image_tokens
        self.lengths = [
            sum(len(m["content"].split()) for m in record.messages) + len(record.images) * num_image_tokens
            for record in records
        ]
        self._failed: set[int] = set()
        if self.problems:
            logger.warning(self.report(limit=20))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, i: int) -> Record:
        return Record.from_json(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        for step in range(len(self)):
            j = (i + step) % len(self)
            if j in self._failed:
                continue
            try:
                return self.load(j)
            except DataError as err:
                if self.strict:
                    raise
                self._failed.add(j)
                self.problems.append(err.problem)
                logger.warning("%s; skipped, serving the next usable record instead", err.problem)
        raise ValueError(f"{self.file}: none of its {self.num_records} records could be loaded; see the problems above")

    def load(self, i: int) -> dict[str, Any]:
        """Sample i without substitution: DataError for a record-level problem, TemplateError/LabelMismatchError
        (always raised: they mean the template and tokenizer do not fit) for a mismatch."""
        record = self.record(i)
        name = f"{self.file} record {record.index}"
        encoded = self.processor.encode_conversation(record.messages, name=name)
        image_id = self.processor.image_token_id
        fitted = fit_length(encoded.input_ids, encoded.labels, image_id, self.max_length, self.overlong)
        if isinstance(fitted, str):
            raise DataError(DataProblem(self.file, record.index, "conversations", fitted, ProblemKind.OVERLONG))
        input_ids, labels = fitted
        pixel_values = None
        if record.images and self.load_images:
            pixel_values = self.processor.image_transform(load_images(record, self.image_folder, self.file))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "id": record.id,
            "images": record.images,  # relative paths, so cached ViT features can stand in for pixel_values
        }

    def problem_counts(self) -> Counter[str]:
        return Counter(str(p.kind) for p in self.problems)

    def report(self, limit: int | None = None) -> str:
        """Counts by kind of the records skipped so far (in this process), then the problems (the first `limit`)."""
        lines = [
            f"{self.file}: {self.num_records} records, {len(self)} usable after the scan, "
            f"{len(self.problems)} problem(s)"
        ]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.problem_counts().items())]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  {problem}" for problem in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (`spatial-mllm data check` lists all)")
        return "\n".join(lines)
