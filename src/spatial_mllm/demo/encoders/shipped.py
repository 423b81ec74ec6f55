"""The encoders shipped in `shipped/` and the manifest that says how each was made.

`shipped/manifest.json`: per encoder ("vit", "llm") the command that reproduces it, the torch thread count and
versions it ran with, its pretraining config (seeds, steps), its held-out metrics, the diagnostics measured on the
demo's world, and the sha256 of every file. Folders are read only after their files match the manifest, so a
damaged or half-replaced copy is refused by name instead of loading as garbage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ...cache import file_digest
from ...files import new_staging_folder, write_json

SHIPPED_DIR = Path(__file__).with_name("shipped")
MANIFEST_FILE = "manifest.json"
ENCODERS = ("vit", "llm")


def read_manifest(root: str | os.PathLike = SHIPPED_DIR) -> dict[str, Any]:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the shipped encoders are missing from this installation")
    return json.loads(path.read_text())


def shipped_encoder(name: str, root: str | os.PathLike = SHIPPED_DIR) -> Path:
    """The folder of shipped encoder `name` ("vit" or "llm"), after checking its files against the manifest."""
    if name not in ENCODERS:
        raise ValueError(f"no shipped encoder {name!r}; shipped: {', '.join(ENCODERS)}")
    entry = read_manifest(root).get(name)
    if entry is None:
        raise FileNotFoundError(f"{Path(root) / MANIFEST_FILE} lists no {name!r} encoder")
    folder = Path(root) / name
    for file_name, expected in entry["files"].items():
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"shipped {name} file {path} is missing; reinstall spatial-mllm")
        if file_digest(path) != expected:
            raise ValueError(f"shipped {name} file {path} does not match its sha256 in {MANIFEST_FILE}; reinstall "
                             "spatial-mllm or remake it with spatial-mllm world-encoders")
    return folder


def ship_encoder(name: str, folder: str | os.PathLike, command: str, environment: dict[str, Any],
                 diagnostics: dict[str, Any], root: str | os.PathLike = SHIPPED_DIR) -> Path:
    """Copy a pretrained folder in as shipped encoder `name` and record it in the manifest (maintainers' step)."""
    if name not in ENCODERS:
        raise ValueError(f"no shipped encoder {name!r}; shipped: {', '.join(ENCODERS)}")
    source, root = Path(folder), Path(root)
    pretraining = json.loads((source / "pretraining.json").read_text())
    staging = new_staging_folder(root, name)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, staging / path.name)
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    manifest = read_manifest(root) if (root / MANIFEST_FILE).is_file() else {}
    manifest[name] = {
        "command": command,
        "environment": environment,
        "config": pretraining["config"],
        "metrics": pretraining["metrics"],
        "diagnostics": diagnostics,
        "files": {path.name: file_digest(path) for path in sorted(target.iterdir())},
    }
    write_json(root / MANIFEST_FILE, manifest)
    return target


__all__ = ["ENCODERS", "SHIPPED_DIR", "read_manifest", "ship_encoder", "shipped_encoder"]
