"""Finding and opening the images a data or question file names: paths stay inside the image folder, and an image
is decoded completely inside one guard, so a missing, truncated, oversized or non-image file is one clear problem
for the record that names it (never a traceback halfway through a run, never a file outside the folder)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image


class ImageProblem(ValueError):
    """Why an image named by a record cannot be used; `kind` is "bad_image_path", "missing_image" or
    "unreadable_image" (the data pipeline's problem kinds)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def resolve_image(folder: str | os.PathLike, relative: str) -> Path:
    """`folder / relative`, refusing absolute paths and paths that leave the folder (`../x.png`, links out)."""
    if os.path.isabs(relative) or Path(relative).drive:
        raise ImageProblem(f"{relative} is an absolute path; image paths are relative to the image folder {folder}",
                           "bad_image_path")
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ImageProblem(f"{relative} leads outside the image folder {folder}", "bad_image_path")
    return path


def check_image_file(folder: str | os.PathLike, relative: str) -> Path:
    """The image's path if it is inside the folder and exists (nothing is decoded: cheap enough for a scan)."""
    path = resolve_image(folder, relative)
    if not path.is_file():
        raise ImageProblem(f"file not found: {relative} (looked in {folder})", "missing_image")
    return path


def open_image(folder: str | os.PathLike, relative: str) -> Image.Image:
    """The image fully decoded as RGB, or ImageProblem naming it (missing, truncated, over Pillow's pixel limit,
    not an image)."""
    path = check_image_file(folder, relative)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"cannot decode {relative}: too large ({err})", "unreadable_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports corrupt files as OSError (truncated, unidentified) or SyntaxError (broken PNG chunks).
        raise ImageProblem(f"cannot decode {relative}: {err}", "unreadable_image") from None


__all__ = ["ImageProblem", "check_image_file", "open_image", "resolve_image"]
