"""`diagnose_vision` and `diagnose_llm`: the numbers `spatial-mllm diagnose` prints, as plain dicts (JSON-ready)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..model.image_transform import ImageTransform
from ..model.builder import image_processor_for
from ..projectors import PROJECTORS, build_projector
from ..vision import VisionTower
from .probe import probe_tower
from .text_accuracy import text_only_results


def projector_layers(tower: VisionTower) -> dict[str, tuple[int, ...]]:
    """The hidden-state indices each registered projector (default options) reads from this tower (as non-negative
    indices); projectors that cannot be built on its grid are left out."""
    read_by = {}
    with torch.device("meta"):  # nothing allocated: only the projectors' feature_layers are wanted
        for name in PROJECTORS.names():
            try:
                read_by[name] = tuple(build_projector(name, tower.geometry, 8).feature_layers)
            except (TypeError, ValueError):  # a projector this tower's grid does not suit
                continue
    return read_by


def diagnose_vision(vision: str | os.PathLike, world: str | os.PathLike, layers: tuple[int, ...] | None = None,
                    fit_images: int = 1000, score_images: int = 300, score_split: str = "test") -> dict[str, Any]:
    """Centre-patch probes of colour, shape and size at `layers` (default: every layer a registered projector reads),
    fit on the world's train images and scored on `score_split`'s, beside the majority-class baseline."""
    try:
        tower = VisionTower.from_pretrained(str(vision))
    except OSError as err:
        raise ValueError(f"--vision {vision}: not a vision model folder ({err})") from None
    read_by = projector_layers(tower)
    chosen = tuple(sorted(set(layers or {layer for found in read_by.values() for layer in found})))
    hidden_states = tower.config.num_hidden_layers + 1
    bad = [layer for layer in chosen if not 0 <= layer < hidden_states and not -hidden_states <= layer < 0]
    if bad:
        raise ValueError(f"layers {bad} do not exist: {vision} has hidden states 0..{hidden_states - 1}")
    transform = ImageTransform(image_processor_for(str(vision)))
    probes = probe_tower(tower, transform, world, chosen, score_split=score_split, fit_images=fit_images,
                         score_images=score_images)
    return {"vision": str(vision), "world": str(world), "read_by": {k: list(v) for k, v in read_by.items()}, **probes}


def diagnose_llm(llm: str | os.PathLike, world: str | os.PathLike, split: str = "test",
                 images: int | None = 100) -> dict[str, Any]:
    """The LLM's accuracy on the split's questions from text alone: with the scene description (its ceiling) and
    without (the answer prior), by category and by question format (short answer, multiple choice); with the
    description, also how its attribute replies bind to the object asked about (`binding_outcomes`). An LLM
    pretrained on grid cells is also asked with each scene as the grid cells of every side it was taught
    ("with_grid<side>": what a patch projector that made those cells exactly would let it reach)."""
    from ..demo.encoders.description_llm import taught_grid_sides
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(llm).is_dir() and not (Path(llm) / "config.json").is_file():
        raise ValueError(f"--llm {llm}: no config.json, not a causal LM folder (model and tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm))
        model = AutoModelForCausalLM.from_pretrained(str(llm)).eval()
    except OSError as err:  # transformers' "not a folder / no config / no tokenizer" errors
        raise ValueError(f"--llm {llm}: not a causal LM folder with its tokenizer ({err})") from None
    result: dict[str, Any] = {"llm": str(llm), "world": str(world), "split": split}
    sides = taught_grid_sides(llm)
    found = text_only_results(model, tokenizer, world, split, images, grid_sides=sides)
    for name in ("with_description", "without_description", *(f"with_grid{side}" for side in sides)):
        result[name] = {key: found[name][key] for key in ("overall", "categories", "types", "counts")}
    result["binding"] = found["binding"]
    return result


def read_world_path(world: str | os.PathLike) -> Path:
    path = Path(world)
    if not path.is_dir():
        raise FileNotFoundError(f"world folder not found: {world} (make one with spatial-mllm data make-world)")
    return path


__all__ = ["diagnose_llm", "diagnose_vision", "projector_layers"]
