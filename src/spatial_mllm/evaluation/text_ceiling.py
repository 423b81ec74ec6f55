"""The text ceiling: how well the language model answers the benchmark from a written scene description instead of
the image. A multimodal model cannot be expected to beat what its LLM reaches when told the scene in words, so the
report draws this level beside the blind control (what is reachable without seeing).

The file (JSON), small on purpose so that whoever measures it (the demo, a diagnostics command) can write it:

    {"text_ceiling_version": 1,
     "model": "runs/demo/cache/llm",                         # what answered
     "condition": "scene description in place of the image",
     "questions_sha256": "…" | null,                          # the question file, checked against the runs' if given
     "counts": {"overall": {"correct": 83, "total": 100},
                "categories": {"color": {"correct": 9, "total": 10}, …},
                "groups": {"attribute": {"correct": 30, "total": 40}, …},     # optional
                "types": {"short": {"correct": 70, "total": 75}, …}}}         # optional: by question format

`counts` has the layout of `score_answers(...)["counts"]`, so `TextCeiling.from_scores` wraps that output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import (
    OPTIONAL_BREAKDOWNS, Tally, read_optional_tallies, read_tallies, read_tally, require_field, require_text,
)

TEXT_CEILING_VERSION = 1
DEFAULT_CONDITION = "scene description in place of the image"


@dataclass(frozen=True)
class TextCeiling:
    model: str
    overall: Tally
    categories: dict[str, Tally]
    groups: dict[str, Tally] = field(default_factory=dict)
    types: dict[str, Tally] = field(default_factory=dict)  # by question format (short answer, multiple choice)
    questions_sha256: str | None = None
    condition: str = DEFAULT_CONDITION

    @classmethod
    def from_scores(
        cls, scores: Mapping[str, Any], model: str, questions_sha256: str | None = None, **extra: str
    ) -> "TextCeiling":
        """From `score_answers(...)` of the language model's answers given the descriptions."""
        return cls.from_dict(
            {"model": model, "questions_sha256": questions_sha256, "counts": scores.get("counts"), **extra},
            "text ceiling scores",
        )

    @classmethod
    def from_dict(cls, data: Any, where: str = "text ceiling") -> "TextCeiling":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("text_ceiling_version", TEXT_CEILING_VERSION)
        if version != TEXT_CEILING_VERSION:
            raise ValueError(f"{where}: text_ceiling_version {version!r} is not {TEXT_CEILING_VERSION}")
        counts = require_field(data, "counts", where)
        if not isinstance(counts, Mapping):
            raise ValueError(f"{where}: field 'counts' must be an object with 'overall' and 'categories'")
        digest = data.get("questions_sha256")
        if digest is not None and not isinstance(digest, str):
            raise ValueError(f"{where}: field 'questions_sha256' must be a string or null, got {digest!r}")
        return cls(
            model=require_text(data, "model", where),
            overall=read_tally(require_field(counts, "overall", f"{where}, counts"), f"{where}, counts 'overall'"),
            categories=read_tallies(require_field(counts, "categories", f"{where}, counts"), f"{where}, categories"),
            **read_optional_tallies(counts, f"{where}, counts"),
            questions_sha256=digest,
            condition=str(data.get("condition") or DEFAULT_CONDITION),
        )

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "overall": self.overall.to_dict(),
            "categories": {name: tally.to_dict() for name, tally in self.categories.items()},
        }
        for kind in OPTIONAL_BREAKDOWNS:
            if getattr(self, kind):
                counts[kind] = {name: tally.to_dict() for name, tally in getattr(self, kind).items()}
        return {
            "text_ceiling_version": TEXT_CEILING_VERSION,
            "model": self.model,
            "condition": self.condition,
            "questions_sha256": self.questions_sha256,
            "counts": counts,
        }


def read_text_ceiling(path: str | Path) -> TextCeiling:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text-ceiling file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return TextCeiling.from_dict(data, str(path))
