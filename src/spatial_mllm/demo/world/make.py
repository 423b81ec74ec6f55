"""Writes a whole world folder: images, scene graphs, LLaVA training JSON, evaluation and POPE files, manifest.

Every random choice comes from a generator seeded by (seed, purpose, split, index), so the same seed gives
byte-identical files, and growing one split never changes the scenes already in it. world.json is written last:
its presence marks a complete folder. docs/world.md describes every file.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from .geometry import DISTANCE_MARGIN, POINTS, REGION_MARGIN, REGIONS, RELATION_MARGIN
from .questions import CATEGORIES, MC_SUFFIX, NEGATIVE_STRATEGIES, SHORT_SUFFIX, TextPolicy
from .records import (
    IMAGE_PLACEHOLDER,
    caption_record,
    eval_records,
    pope_records,
    stage1_record,
    stage2_record,
    text_only_record,
)
from .render import png_bytes, render_scene
from .scene import COLORS, OBJECT_GAP, SHAPES, SIZES, SPLITS, Scene, WorldConfig, derive_seed, generate_scene

WORLD_VERSION = 3  # 2: answer keys name the region of the object asked about; 3: stage-2 category emphasis
MANIFEST = "world.json"
SCENES_FILE = "scenes.jsonl"
IMAGES_DIR = "images"
TRAINING_SPLITS = ("train", "val")  # get stage-1 and stage-2 LLaVA JSON
EVAL_SPLITS = ("val", "test", "holdout")  # get evaluation questions, answer keys and POPE files
TEXT_ONLY_FRACTION = 0.02  # text-only samples in stage 2, relative to the split's images


def split_files(split: str) -> dict[str, Any]:
    """File names (relative to the world folder) written for `split`."""
    files: dict[str, Any] = {"captions": f"captions_{split}.jsonl"}
    if split in TRAINING_SPLITS:
        files["stage1"] = f"llava_stage1_{split}.json"
        files["stage2"] = f"llava_stage2_{split}.json"
    if split in EVAL_SPLITS:
        files["questions"] = f"eval_{split}_questions.jsonl"
        files["answer_key"] = f"eval_{split}_answer_key.jsonl"
        files["pope"] = {strategy: f"pope_{split}_{strategy}.jsonl" for strategy in NEGATIVE_STRATEGIES}
    return files


def make_world(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 200,
    n_test: int = 500,
    n_holdout: int = 300,
    canvas: int = 96,
    min_objects: int = 2,
    max_objects: int = 5,
    stage2_emphasis: dict[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates the world into `out_dir` and returns its manifest (also written to world.json).

    stage2_emphasis: category -> weight (others 1) with which stage-2 conversations draw their questions, e.g.
    {"size_compare": 2.0}; none: every category alike. Evaluation files do not depend on it."""
    for category, weight in (stage2_emphasis or {}).items():
        if category not in CATEGORIES or not weight > 0:
            raise ValueError(f"stage2_emphasis: {category!r}: {weight!r} must name a category "
                             f"({', '.join(CATEGORIES)}) with a positive weight")
    counts = {"train": n_train, "val": n_val, "test": n_test, "holdout": n_holdout}
    for split, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"the number of {split} images must be a non-negative integer, got {count!r}")
    config = WorldConfig(canvas=canvas, min_objects=min_objects, max_objects=max_objects)
    out = Path(out_dir)
    _prepare_folder(out, overwrite)
    (out / IMAGES_DIR).mkdir(parents=True)

    scenes: dict[str, list[Scene]] = {}
    with tqdm(total=sum(counts.values()), desc="rendering world", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            scenes[split] = []
            for index in range(counts[split]):
                scene = generate_scene(
                    config,
                    random.Random(derive_seed(seed, "scene", split, index)),
                    f"{split}_{index:06d}",
                    split,
                    derive_seed(seed, "noise", split, index),
                )
                (out / scene.image).write_bytes(png_bytes(render_scene(scene)))
                scenes[split].append(scene)
                bar.update()
    _write_jsonl(out / SCENES_FILE, (scene.to_dict() for split in SPLITS for scene in scenes[split]))

    question_counts, text_only = {}, {}
    for split in SPLITS:
        policy = TextPolicy.for_split(config, split, scenes[split])
        files = split_files(split)
        _write_jsonl(out / files["captions"], (caption_record(scene) for scene in scenes[split]))
        if split in TRAINING_SPLITS:
            text_only[split] = _write_training(out, files, seed, split, scenes[split], policy, stage2_emphasis)
        if split in EVAL_SPLITS:
            question_counts[split] = _write_evaluation(out, files, seed, split, scenes[split], policy)

    manifest = _manifest(seed, config, counts, text_only, question_counts, stage2_emphasis or {})
    _write_json(out / MANIFEST, manifest)
    return manifest


def _write_training(
    out: Path, files: dict[str, Any], seed: int, split: str, scenes: list[Scene], policy: TextPolicy,
    emphasis: dict[str, float] | None,
) -> int:
    stage1 = [stage1_record(s, random.Random(derive_seed(seed, "stage1", s.id))) for s in scenes]
    stage2 = [stage2_record(s, random.Random(derive_seed(seed, "stage2", s.id)), policy, emphasis) for s in scenes]
    n_text = max(1, round(TEXT_ONLY_FRACTION * len(scenes))) if scenes else 0
    # Appended after the image samples; trainers shuffle.
    for k in range(n_text):
        record_id = f"{split}_text_{k:06d}"
        stage2.append(text_only_record(record_id, random.Random(derive_seed(seed, "text_only", record_id))))
    _write_json(out / files["stage1"], stage1)
    _write_json(out / files["stage2"], stage2)
    return n_text


def _write_evaluation(
    out: Path, files: dict[str, Any], seed: int, split: str, scenes: list[Scene], policy: TextPolicy
) -> dict[str, int]:
    pairs = [pair for s in scenes for pair in eval_records(s, random.Random(derive_seed(seed, "eval", s.id)), policy)]
    _write_jsonl(out / files["questions"], (question for question, _ in pairs))
    _write_jsonl(out / files["answer_key"], (key for _, key in pairs))
    for strategy, name in files["pope"].items():
        records = (
            record
            for s in scenes
            for record in pope_records(s, random.Random(derive_seed(seed, "pope", strategy, s.id)), policy, strategy)
        )
        _write_jsonl(out / name, records)
    per_category = Counter(question["category"] for question, _ in pairs)
    return {category: per_category[category] for category in CATEGORIES}


def _manifest(
    seed: int,
    config: WorldConfig,
    counts: dict[str, int],
    text_only: dict[str, int],
    question_counts: dict[str, dict[str, int]],
    stage2_emphasis: dict[str, float],
) -> dict[str, Any]:
    return {
        "version": WORLD_VERSION,
        "generator": "spatial_mllm.demo.world",
        "seed": seed,
        "canvas": config.canvas,
        "config": config.to_dict(),
        "counts": counts,
        "text_only_samples": text_only,
        "stage2_emphasis": stage2_emphasis,
        "question_counts": question_counts,
        "vocabulary": {
            "shapes": list(SHAPES),
            "colors": {name: list(rgb) for name, rgb in COLORS.items()},
            "sizes": {name: config.half_extent(name) for name in SIZES},
            "regions": list(REGIONS),
            "points": list(POINTS),
        },
        "holdout": {
            "color_shape": [list(p) for p in config.holdout_color_shape],
            "shape_region": [list(p) for p in config.holdout_shape_region],
        },
        "categories": CATEGORIES,
        "negative_strategies": list(NEGATIVE_STRATEGIES),
        "prompts": {"image_token": IMAGE_PLACEHOLDER, "short_suffix": SHORT_SUFFIX, "mc_suffix": MC_SUFFIX},
        "thresholds": {
            "relation": RELATION_MARGIN,
            "distance": DISTANCE_MARGIN,
            "region": REGION_MARGIN,
            "object_gap": OBJECT_GAP,
        },
        "files": {
            "scenes": SCENES_FILE,
            "images": IMAGES_DIR,
            "splits": {split: split_files(split) for split in SPLITS},
        },
    }


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"world folder {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"world folder {out} is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST).is_file():
            raise ValueError(f"refusing to replace {out}: it has no {MANIFEST}, so it is not a world folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, sort_keys=True, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
