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


def check_output(
    path: str | os.PathLike,
    what: str,
    *,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
    folder: bool = False,
) -> Path:
    """The rule for everything a command writes, checked before any work: an output that is one of the inputs is
    refused; an existing output is replaced only with `overwrite`; a file output must not be a folder (and the
    reverse). `what` names the output in messages (e.g. "--out"), `inputs` maps input names to paths."""
    path = Path(path)
    for name, given in (inputs or {}).items():
        if given is not None and path.resolve() == Path(given).resolve():
            raise ValueError(f"{what} {path} is also the input {name}: writing it would destroy the input; choose another")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder; name the file to write")
    exists = path.is_dir() and any(path.iterdir()) if folder else path.exists()
    if exists and not overwrite:
        state = "already exists and is not an empty folder" if folder else "already exists"
        raise FileExistsError(f"{what} {path} {state}; pass --overwrite to replace it")
    return path


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


def rename(path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Atomically move `path` to `target` in the same folder, the move itself made durable."""
    os.replace(path, target)
    fsync_dir(Path(target).parent)
    return Path(target)


def new_staging_folder(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden folder in `parent` to assemble outputs in before they are moved into place."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}.", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def move_into(staging: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """Move every file of a fully written staging folder into `folder` (each replacing its namesake atomically),
    remove the staging folder, and return the names moved."""
    staging, folder = Path(staging), Path(folder)
    fsync_tree(staging)
    names = sorted(path.name for path in staging.iterdir())
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            shutil.rmtree(folder / name)
        os.replace(staging / name, folder / name)
    staging.rmdir()
    fsync_dir(folder)
    return names


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


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_folder(folder: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` a folder beside `folder` (under a unique hidden name), then rename it to `folder`, replacing
    what was there."""
    folder = Path(folder)
    staging = new_staging_folder(folder.parent, folder.name)
    try:
        build(staging)
        return publish(staging, folder)
    finally:
        if staging.exists():
            _clear(staging)


__all__ = ["check_output", "fsync_dir", "move_into", "new_staging_folder", "rename", "fsync_tree", "publish", "read_json_object", "staging_path", "write_file", "write_folder", "write_json", "write_text"]
