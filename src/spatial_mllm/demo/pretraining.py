"""What encoder pretraining leaves beside its weights: a record of its config and metrics, and the cache of
pretrained folders keyed by everything that made them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cached_folder

PRETRAINING_FILE = "pretraining.json"  # config and metrics of a pretrained encoder folder


@dataclass(frozen=True)
class PretrainResult:
    """A pretrained encoder folder, its metrics, and whether it came from the cache."""

    path: Path
    metrics: dict[str, float]
    reused: bool = False


def write_pretraining_record(folder: Path, config: dict[str, Any], metrics: dict[str, float]) -> None:
    (folder / PRETRAINING_FILE).write_text(json.dumps({"config": config, "metrics": metrics}, indent=1) + "\n")


def read_pretraining_metrics(folder: str | os.PathLike) -> dict[str, float]:
    path = Path(folder) / PRETRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder written by spatial_mllm pretraining")
    return json.loads(path.read_text())["metrics"]


def cached_pretraining(
    cache_dir: str | os.PathLike, name: str, key: str, train: Callable[[Path], Any]
) -> PretrainResult:
    """Reuse `cache_dir/<name>-<key>` when present, else `train(tmp_folder)` and publish it under that name."""
    entry = cached_folder(cache_dir, name, key, train)
    return PretrainResult(entry.path, read_pretraining_metrics(entry.path), reused=entry.reused)


__all__ = ["PRETRAINING_FILE", "PretrainResult", "cached_pretraining", "read_pretraining_metrics", "write_pretraining_record"]
