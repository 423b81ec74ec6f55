"""What encoder pretraining leaves beside its weights: a record of its config and metrics, and the cache of
pretrained folders keyed by everything that made them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.optimization import get_cosine_schedule_with_warmup

from ..cache import cached_folder
from ..files import write_folder

PRETRAINING_FILE = "pretraining.json"  # config and metrics of a pretrained encoder folder


@dataclass(frozen=True)
class PretrainResult:
    """A pretrained encoder folder, its metrics, and whether it came from the cache."""

    path: Path
    metrics: dict[str, float]
    reused: bool = False


def write_pretraining_record(folder: Path, config: dict[str, Any], metrics: dict[str, float]) -> None:
    (folder / PRETRAINING_FILE).write_text(json.dumps({"config": config, "metrics": metrics}, indent=1) + "\n")


def save_pretrained_folder(out_dir: str | os.PathLike, parts: Sequence[Any], config: dict[str, Any],
                           metrics: dict[str, float]) -> PretrainResult:
    """Save every part (model, image processor, tokenizer: anything with `save_pretrained`) and pretraining.json
    into out_dir, which appears whole or not at all."""

    def save(folder: Path) -> None:
        for part in parts:
            part.save_pretrained(folder)
        write_pretraining_record(folder, config, metrics)

    write_folder(out_dir, save)
    return PretrainResult(Path(out_dir), metrics)


def read_pretraining_record(folder: str | os.PathLike) -> dict[str, Any]:
    """{"config": ..., "metrics": ...} of a folder written by pretraining."""
    path = Path(folder) / PRETRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder written by spatial_mllm pretraining")
    return json.loads(path.read_text())


def read_pretraining_metrics(folder: str | os.PathLike) -> dict[str, float]:
    return read_pretraining_record(folder)["metrics"]


def cached_pretraining(
    cache_dir: str | os.PathLike, name: str, key: str, train: Callable[[Path], Any]
) -> PretrainResult:
    """Reuse `cache_dir/<name>-<key>` when present, else `train(tmp_folder)` and publish it under that name."""
    entry = cached_folder(cache_dir, name, key, train)
    return PretrainResult(entry.path, read_pretraining_metrics(entry.path), reused=entry.reused)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    seed: int
    betas: tuple[float, float] = (0.9, 0.999)


def optimise(
    name: str,
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: Callable[[int, torch.Tensor], tuple[torch.Tensor, str]],
    rows: int,
    schedule: Schedule,
    log: Callable[[str], None] | None = None,
    log_every: int = 10,
) -> list[float]:
    """AdamW with warmup then cosine decay over `schedule.steps` batches of rows drawn at random (seeded) from
    0..rows-1, gradients clipped at norm 1. `batch_loss(step, rows)` (step from 0) returns the batch's loss and a
    note for the log.
    Returns the loss of every step; a non-finite loss stops the run with an error naming the step."""
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr, weight_decay=schedule.weight_decay,
                                  betas=schedule.betas)
    scheduler = get_cosine_schedule_with_warmup(optimizer, schedule.warmup_steps, schedule.steps)
    generator = torch.Generator().manual_seed(schedule.seed + 1)
    losses: list[float] = []
    for step in range(schedule.steps):
        batch = torch.randint(0, rows, (schedule.batch_size,), generator=generator)
        loss, note = batch_loss(step, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name} pretraining diverged at step {step + 1} (non-finite loss); lower lr")
        if log is not None and (step + 1) % max(1, schedule.steps // log_every) == 0:
            log(f"{name} step {step + 1}/{schedule.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} {note}")
    return losses


def loss_summary(losses: Sequence[float], window: int) -> dict[str, float]:
    """Mean loss over the first and the last `window` steps (at most a fifth of the run each)."""
    window = max(1, min(window, len(losses) // 5))
    return {"initial_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window}


__all__ = [
    "PRETRAINING_FILE", "PretrainResult", "Schedule", "cached_pretraining", "loss_summary", "optimise",
    "read_pretraining_metrics", "read_pretraining_record", "save_pretrained_folder", "write_pretraining_record",
]
