"""Data benchmarks: images per second of built-in world generation, samples per second of loading + collation.

    .venv/bin/python benchmarks/data.py [--images 500] [--canvas 96 224] [--records 256] [--image-size 336]
        [--batch-size 16] [--workers 0 2] [--num-image-tokens 576] [--json runs/benchmarks/data.json]

Generation: scene generation, rendering and PNG encoding timed on their own in memory, then make_world writing a
whole folder, for each --canvas.

Loading: a world of --records train images (canvas: the first --canvas) generated into a temporary folder, its
tokenizer trained on its text (spatial_mllm.demo.tokenizer), and its stage-2 LLaVA JSON read through LlavaDataset +
DataCollator in a torch DataLoader, through a processor with CLIP's image processor at --image-size. One full pass
per setting and worker count: "text only" (load_images=False: JSON record, template, tokenisation, label
verification, collation) and "text+images" (plus PNG decoding and the image transform).

The main process runs torch with --torch-threads (default 1, as DataLoader workers do): per-sample tensors are
small, and more threads mostly add contention (on a busy 2-core machine, 6x slower with the default thread count).

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

import torch
from torch.utils.data import DataLoader

from transformers import CLIPImageProcessorPil

from spatial_mllm.data.collator import DataCollator
from spatial_mllm.data.dataset import LlavaDataset
from spatial_mllm.demo.tokenizer import train_world_tokenizer, world_texts
from spatial_mllm.demo.world import WorldConfig, generate_scene, make_world, render_scene
from spatial_mllm.demo.world.make import split_files
from spatial_mllm.demo.world.render import png_bytes
from spatial_mllm.demo.world.scene import derive_seed
from spatial_mllm.model import SpatialMLLMProcessor

Row = dict[str, object]


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def row(benchmark: str, canvas: int, images: int, seconds: float) -> Row:
    return {
        "benchmark": benchmark,
        "canvas": canvas,
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_s": per_second(images, seconds),
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


def time_pass(dataset: LlavaDataset, batch_size: int, workers: int, pad_token_id: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=DataCollator(pad_token_id))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loading_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    canvas = args.canvas[0]
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        make_world(world, seed=args.seed, n_train=args.records, n_val=0, n_test=0, n_holdout=0, canvas=canvas,
                   progress=False)  # fmt: skip
        tokenizer = train_world_tokenizer(world_texts(world), Path(tmp) / "tokenizer")
        json_path = world / split_files("train")["stage2"]
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
        )
        processor = SpatialMLLMProcessor(image_processor, tokenizer, args.num_image_tokens, chat_template="vicuna_v1")
        for setting, load_images in (("text only", False), ("text+images", True)):
            dataset = LlavaDataset(json_path, world, processor, max_length=args.num_image_tokens + 512,
                                   load_images=load_images)
            for workers in args.workers:
                seconds = time_pass(dataset, args.batch_size, workers, tokenizer.pad_token_id)
                rows.append({
                    "benchmark": f"load+collate, {setting}",
                    "canvas": canvas,
                    "image_size": args.image_size,
                    "batch_size": args.batch_size,
                    "workers": workers,
                    "torch_threads": torch.get_num_threads(),
                    "samples": len(dataset),
                    "seconds": round(seconds, 4),
                    "samples_per_s": per_second(len(dataset), seconds),
                })
    return rows


SECTIONS: list[Callable[[argparse.Namespace], list[Row]]] = [generation_rows, loading_rows]


def format_table(rows: list[Row]) -> str:
    columns = list(dict.fromkeys(key for r in rows for key in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images per generation measurement (default 500)")
    parser.add_argument("--canvas", type=int, nargs="+", default=[96], help="canvas sides to measure (default 96)")
    parser.add_argument("--records", type=int, default=256, help="train images of the world the loading pass reads")
    parser.add_argument("--image-size", type=int, default=336, help="side of the transform output")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--num-image-tokens", type=int, default=576, help="image tokens per image (576: LLaVA-1.5)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/benchmarks/data.json", help="where to write the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    rows = [r for section in SECTIONS for r in section(args)]
    print(format_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
