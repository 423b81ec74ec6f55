"""Writing outputs so that they appear whole or not at all.

Every file and folder the toolkit writes (answers, scores, reports, checkpoints, merged models, caches) is built
under a hidden temporary name beside its target, flushed to disk, then renamed into place: a run killed at any
moment leaves either the complete output or none (plus, at worst, a hidden `.tmp-*` that the next writer clears).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".tmp-"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def staging_path(target: str | os.PathLike) -> Path:
    """The hidden name beside `target` that it is assembled under."""
    target = Path(target)
    return target.parent / f"{STAGING_PREFIX}{target.name}"


def publish(staging: Path, target: str | os.PathLike | None = None) -> Path:
    """Make a fully written staging file or folder durable and visible under its final name, atomically.

    `target` defaults to the staging name without its prefix. An existing target is replaced (callers decide
    beforehand whether that is allowed)."""
    staging = Path(staging)
    final = Path(target) if target is not None else staging.parent / staging.name.removeprefix(STAGING_PREFIX)
    if staging.is_dir():
        fsync_tree(staging)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
    else:
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a file beside `path` (under a unique hidden name), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    staging = Path(name)
    try:
        write(staging)
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp (and safetensors) make files private; outputs get the usual mode
        return publish(staging, path)
    finally:
        if staging.exists():
            _clear(staging)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_folder(folder: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` a folder beside `folder` (under a unique hidden name), then rename it to `folder`, replacing
    what was there."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{folder.name}.", dir=folder.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        build(staging)
        return publish(staging, folder)
    finally:
        if staging.exists():
            _clear(staging)


__all__ = ["fsync_dir", "fsync_tree", "publish", "staging_path", "write_file", "write_folder", "write_json", "write_text"]
