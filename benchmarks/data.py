"""Data benchmarks: how many images per second the built-in world generates (a loading section follows later).

    .venv/bin/python benchmarks/data.py [--images 500] [--canvas 96 224] [--json runs/benchmarks/data.json]

Prints one table and writes its rows as JSON. Each section is a function from the parsed options to rows (dicts;
the table shows the union of their keys, blank where a row lacks one); SECTIONS lists them in the order they run.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

from spatial_mllm.data.world import WorldConfig, generate_scene, make_world, render_scene
from spatial_mllm.data.world.render import png_bytes
from spatial_mllm.data.world.scene import derive_seed

Row = dict[str, object]


def row(benchmark: str, canvas: int, images: int, seconds: float) -> Row:
    return {
        "benchmark": benchmark,
        "canvas": canvas,
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_s": round(images / seconds, 1) if seconds > 0 else float("inf"),
    }


def bench_pipeline(canvas: int, images: int, seed: int) -> list[Row]:
    """Scene generation, rendering and PNG encoding, each timed on its own, in memory."""
    config = WorldConfig(canvas=canvas)
    start = time.perf_counter()
    scenes = [
        generate_scene(config, random.Random(derive_seed(seed, "scene", "train", i)), f"b{i}", "train", i)
        for i in range(images)
    ]
    generated = time.perf_counter()
    rendered = [render_scene(scene) for scene in scenes]
    drawn = time.perf_counter()
    for image in rendered:
        png_bytes(image)
    encoded = time.perf_counter()
    return [
        row("scene generation", canvas, images, generated - start),
        row("rendering", canvas, images, drawn - generated),
        row("PNG encoding", canvas, images, encoded - drawn),
        row("generation+rendering+PNG", canvas, images, encoded - start),
    ]


def bench_make_world(canvas: int, images: int, seed: int) -> Row:
    """The whole folder: images on disk plus every text file, for `images` train images (others proportional)."""
    with tempfile.TemporaryDirectory() as folder:
        n_val = n_test = n_holdout = max(1, images // 10)
        start = time.perf_counter()
        make_world(Path(folder) / "world", seed=seed, n_train=images, n_val=n_val, n_test=n_test,
                   n_holdout=n_holdout, canvas=canvas, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
    return row("make_world (all files)", canvas, images + n_val + n_test + n_holdout, seconds)


def generation_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    for canvas in args.canvas:
        rows += bench_pipeline(canvas, args.images, args.seed)
        rows.append(bench_make_world(canvas, args.images, args.seed))
    return rows


SECTIONS: list[Callable[[argparse.Namespace], list[Row]]] = [generation_rows]


def format_table(rows: list[Row]) -> str:
    columns = list(dict.fromkeys(key for r in rows for key in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images per measurement (default 500)")
    parser.add_argument("--canvas", type=int, nargs="+", default=[96], help="canvas sides to measure (default 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/benchmarks/data.json", help="where to write the rows")
    args = parser.parse_args(argv)
    rows = [r for section in SECTIONS for r in section(args)]
    print(format_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
