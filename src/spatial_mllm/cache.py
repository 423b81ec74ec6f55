"""Work done once and reused: content digests, and folders cached under the digest of what made them.

A cache entry is a folder named by a key that covers everything that decides its content (a config, the data's
digest, the code's digest); it is reused when it exists and built atomically otherwise (files.write_folder), so
a crash never leaves a half-written entry that looks complete, and a changed input makes a new key instead of
a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .files import write_folder


def digest(*parts: Any) -> str:
    """sha256 of JSON-serialisable parts (dict keys sorted), e.g. a config dict and other digests."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of named tensors: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def images_digest(images: Sequence[Image.Image | str | os.PathLike]) -> str:
    """Digest of images in order: file bytes for paths, mode + size + pixels for PIL images."""
    h = hashlib.sha256()
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            h.update(f"{image.mode}|{image.size}|".encode())
            h.update(image.tobytes())
        elif Path(image).is_file():
            h.update(Path(image).read_bytes())
        else:
            raise FileNotFoundError(f"image {index} not found: {image}")
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Digest of what decides token ids: the vocabulary, special tokens and (for fast tokenizers) the pipeline
    (its padding and truncation settings aside: they change with use, not with the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = {}
    if backend is not None:
        pipeline = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    return digest(sorted(tokenizer.get_vocab().items()), sorted(tokenizer.all_special_tokens), pipeline)


def code_version(*source_files: str | os.PathLike) -> str:
    """Digest of source files (pass a module's `__file__`): editing the code that made a cache invalidates it."""
    from spatial_mllm import __version__

    return digest(__version__, [file_digest(f) for f in source_files])


@dataclass(frozen=True)
class CachedFolder:
    path: Path
    reused: bool


def cached_folder(root: str | os.PathLike, name: str, key: str, build: Callable[[Path], None]) -> CachedFolder:
    """`root/<name>-<key prefix>`, built by `build(tmp_folder)` unless it already exists."""
    folder = Path(root) / f"{name}-{key[:20]}"
    if folder.is_dir():
        return CachedFolder(folder, reused=True)
    write_folder(folder, build)
    return CachedFolder(folder, reused=False)


__all__ = [
    "CachedFolder",
    "cached_folder",
    "code_version",
    "digest",
    "file_digest",
    "images_digest",
    "tensors_digest",
    "tokenizer_digest",
]
