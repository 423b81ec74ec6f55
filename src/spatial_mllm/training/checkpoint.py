"""Resumable checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is `<output_dir>/checkpoints/step-<N>/`:
  trainable.safetensors      the trainable weights (projector, LoRA adapter or LLM, ...) by parameter name
  optimizer.{safetensors,json}, scheduler.{safetensors,json}
  rng-rank<R>.{safetensors,json}   python / numpy / torch (/ CUDA) generator states of each process
  trainer_state.json         step, data position, ...; written last
It is assembled in a hidden temporary folder, fsynced, then renamed into place, so a run killed at any moment
leaves either a complete checkpoint or none. Nothing here unpickles: state is rebuilt from tensors and JSON.

Under DeepSpeed or FSDP the weights and optimiser state are sharded across processes: those two parts are then
written by `accelerator.save_state` (each process its shard) into `sharded_state/` of the same folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import files
from ..files import write_json

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
SHARDED_STATE = "sharded_state"
STEP_FOLDER = re.compile(r"^step-(\d+)$")
DELETING_PREFIX = ".tmp-delete-"


class CorruptCheckpointError(ValueError):
    """A checkpoint's files cannot be read (truncated, zeroed, missing a part): resume falls back to an older one."""


@dataclass
class TrainerState:
    step: int  # optimiser steps done
    epoch: int  # epoch of the next batch
    step_in_epoch: int  # global batches of that epoch already consumed (the sampler order is fixed by seed + epoch)
    samples_seen: int
    total_steps: int
    world_size: int
    fingerprint: dict[str, Any] = field(default_factory=dict)  # config values a resumed run must share

    def save(self, folder: Path) -> None:
        write_json(folder / TRAINER_STATE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        path = folder / TRAINER_STATE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise CorruptCheckpointError(f"{path}: not a trainer state ({err})") from None


# --- nested state (optimiser, scheduler, RNG) as safetensors + JSON ----------------------------------------------------


def save_tree(tree: Any, folder: Path, name: str) -> None:
    """Writes a nested structure of dicts / lists / tuples / scalars / tensors / numpy arrays as
    `<name>.safetensors` (every tensor) + `<name>.json` (the structure, tensors replaced by references)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().cpu().clone().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": encode(torch.from_numpy(obj.copy()))}
        if isinstance(obj, tuple):
            return {"__tuple__": [encode(v) for v in obj]}
        if isinstance(obj, list):
            return [encode(v) for v in obj]
        if isinstance(obj, dict):
            # JSON keys are strings; optimiser state is keyed by int parameter index, so keep keys typed.
            return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in checkpoint part {name!r}")

    structure = encode(tree)
    save_file(tensors, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", structure)


def load_tree(folder: Path, name: str) -> Any:
    tensors = load_file(folder / f"{name}.safetensors")

    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__ndarray__" in obj:
                return decode(obj["__ndarray__"]).numpy()
            if "__tuple__" in obj:
                return tuple(decode(v) for v in obj["__tuple__"])
            return {decode(k): decode(v) for k, v in obj["__items__"]}
        return obj

    return decode(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")))


# --- random generators ----------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_part(rank: int) -> str:
    return f"rng-rank{rank}"


# --- folders ---------------------------------------------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_folder(output_dir: str | Path, step: int) -> Path:
    """The hidden folder a checkpoint is assembled in before `publish` renames it into place."""
    return checkpoint_root(output_dir) / f".tmp-{step_folder_name(step)}"


def publish(staging: Path) -> Path:
    """Makes a fully written staging folder durable and visible under its final name, atomically (a run resumed
    from an older checkpoint rewrites the later ones)."""
    return files.publish(staging)


def is_complete(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() and (
        (folder / TRAINABLE_WEIGHTS).is_file() or (folder / SHARDED_STATE).is_dir()
    )


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_FOLDER.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Deletes all but the last `keep_last` checkpoints. Each is first renamed to a hidden name (atomic), so a run
    killed while deleting leaves a hidden half-deleted folder that the next start clears, never a checkpoint that
    looks complete and is not."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        doomed = old.parent / f"{DELETING_PREFIX}{old.name}"
        files.rename(old, doomed)
        shutil.rmtree(doomed)


def remove_stale_staging(output_dir: str | Path) -> None:
    """Half-written checkpoints and half-deleted ones of a killed run."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in [*root.glob(".tmp-step-*"), *root.glob(f"{DELETING_PREFIX}*")]:
            shutil.rmtree(path)


# --- whole checkpoints -------------------------------------------------------------------------------------------------


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    output_dir: str | Path,
    keep_last: int,
) -> Path:
    """Writes `<output_dir>/checkpoints/step-<state.step>` atomically (every process calls this) and keeps the last
    `keep_last` checkpoints. Returns the checkpoint folder."""
    main = accelerator.is_main_process
    staging = staging_folder(output_dir, state.step)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if is_sharded(accelerator):
        accelerator.save_state(str(staging / SHARDED_STATE))
    elif main:
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        save_file(trainable, staging / TRAINABLE_WEIGHTS)
        save_tree(optimizer.state_dict(), staging, "optimizer")
    if main:
        save_tree(scheduler.state_dict(), staging, "scheduler")
    save_tree(capture_rng(), staging, rng_part(accelerator.process_index))
    accelerator.wait_for_everyone()
    if main:
        state.save(staging)  # last: its presence marks the checkpoint complete
        publish(staging)
        prune_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return checkpoint_root(output_dir) / step_folder_name(state.step)


def load_checkpoint(
    folder: Path,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> tuple[TrainerState, dict[str, Any] | None]:
    """Restores weights, optimiser and scheduler from a checkpoint; returns its trainer state and this process's
    RNG state (None if the checkpoint was written by fewer processes), to restore right before training resumes.

    Every part is read before anything is restored, so a checkpoint whose files are damaged raises
    CorruptCheckpointError (naming the file) and leaves the model as it was. Settings that differ from the
    checkpoint's run are a ValueError: that is no reason to fall back to an older checkpoint."""
    state = TrainerState.load(folder)
    differences = [
        f"{key}: checkpoint {state.fingerprint.get(key)!r}, now {value!r}"
        for key, value in fingerprint.items()
        if state.fingerprint.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {folder}: it belongs to a run with other settings ({'; '.join(differences)}); "
            "use the same settings or a new output_dir"
        )
    rank_part = rng_part(accelerator.process_index)
    if is_sharded(accelerator):
        scheduler_state = _read(folder, "scheduler", lambda: load_tree(folder, "scheduler"))
        rng = _read(folder, rank_part, lambda: load_tree(folder, rank_part)) if (folder / f"{rank_part}.json").is_file() else None
        try:
            accelerator.load_state(str(folder / SHARDED_STATE))
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise CorruptCheckpointError(f"{folder / SHARDED_STATE}: cannot be loaded ({str(err)[:200]})") from None
    else:
        weights = _read(folder, TRAINABLE_WEIGHTS, lambda: load_file(folder / TRAINABLE_WEIGHTS))
        optimizer_state = _read(folder, "optimizer", lambda: load_tree(folder, "optimizer"))
        scheduler_state = _read(folder, "scheduler", lambda: load_tree(folder, "scheduler"))
        rng = _read(folder, rank_part, lambda: load_tree(folder, rank_part)) if (folder / f"{rank_part}.json").is_file() else None
        load_trainable(accelerator.unwrap_model(model), folder / TRAINABLE_WEIGHTS, weights)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    return state, rng


def _read(folder: Path, part: str, read):
    try:
        return read()
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{folder}: part {part!r} cannot be read ({type(err).__name__}: {err})") from None


def load_trainable(model: nn.Module, path: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Copies checkpointed trainable weights (read from `path` unless given) into the model; the names and shapes
    must be exactly its trainable parameters'."""
    weights = load_file(path) if weights is None else weights
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{path} does not match the model's trainable parameters: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    wrong = [name for name, tensor in weights.items() if tensor.shape != params[name].shape]
    if wrong:
        raise CorruptCheckpointError(f"{path}: shapes differ from the model's for {wrong[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


__all__ = [
    "CorruptCheckpointError",
    "TRAINABLE_WEIGHTS",
    "TrainerState",
    "capture_rng",
    "checkpoint_root",
    "is_complete",
    "is_sharded",
    "load_checkpoint",
    "load_trainable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_tree",
    "prune_checkpoints",
    "publish",
    "remove_stale_staging",
    "restore_rng",
    "rng_part",
    "save_checkpoint",
    "save_tree",
    "staging_folder",
]
