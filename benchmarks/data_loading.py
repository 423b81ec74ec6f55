"""Data loading benchmark: samples per second through LlavaDataset + DataCollator in a torch DataLoader.

    .venv/bin/python benchmarks/data_loading.py [--records 256] [--image-size 336] [--batch-size 16]
        [--workers 0 2] [--num-image-tokens 576] [--json runs/benchmarks/data_loading.json]

Builds a temporary LLaVA JSON file whose records point at PNGs drawn with Pillow (random rectangles), a tokenizer
trained on its text (spatial_mllm.data.tokenizer), and an image transform shaped like CLIP preprocessing (resize to
--image-size, scale, normalise; the real processor costs about the same). Measures one full pass per setting:
"text only" (image_transform None: JSON record, template, tokenisation, label verification, collation) and
"text+images" (plus PNG decoding and the transform). Prints one table and writes its rows as JSON.

The main process runs torch with --torch-threads (default 1, as DataLoader workers do): per-sample tensors are
small, and more threads mostly add contention (on a busy 2-core machine, 6x slower with the default thread count).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from spatial_mllm.data.collator import DataCollator
from spatial_mllm.data.dataset import LlavaDataset
from spatial_mllm.data.tokenizer import train_world_tokenizer

Row = dict[str, object]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "triangle"]
SIDES = ["left", "right"]
CLIP_MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)


def write_dataset(folder: Path, records: int, image_size: int, seed: int) -> Path:
    """A LLaVA JSON file of `records` image conversations (1-3 exchanges) with one PNG each."""
    rng = random.Random(seed)
    (folder / "images").mkdir()
    data = []
    for i in range(records):
        image = Image.new("RGB", (image_size, image_size * 3 // 4), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 5)):
            x, y = rng.randrange(image.width - 20), rng.randrange(image.height - 20)
            draw.rectangle((x, y, x + rng.randint(10, 60), y + rng.randint(10, 60)), fill=rng.choice(COLOURS))
        image.save(folder / "images" / f"{i}.png")
        turns = []
        for k in range(rng.randint(1, 3)):
            colour, shape, side, other = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SIDES), rng.choice(SHAPES)
            question = f"Where is the {colour} {shape}?"
            turns += [
                {"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                {"from": "gpt", "value": f"The {colour} {shape} is {side} of the {other}."},
            ]
        data.append({"id": str(i), "image": f"images/{i}.png", "conversations": turns})
    path = folder / "data.json"
    path.write_text(json.dumps(data))
    return path


def clip_like_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    def transform(image: Image.Image) -> torch.Tensor:
        resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)
        return (pixels - CLIP_MEAN) / CLIP_STD

    return transform


def time_pass(dataset: LlavaDataset, batch_size: int, workers: int, pad_token_id: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=DataCollator(pad_token_id))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loading_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        json_path = write_dataset(folder, args.records, args.image_size, args.seed)
        texts = [turn["value"] for record in json.loads(json_path.read_text()) for turn in record["conversations"]]
        tokenizer = train_world_tokenizer(texts, folder / "tokenizer", vocab_size=512)
        for setting, transform in (("text only", None), ("text+images", clip_like_transform(args.image_size))):
            dataset = LlavaDataset(json_path, folder, tokenizer, "vicuna_v1", args.num_image_tokens, transform,
                                   max_length=args.num_image_tokens + 512)  # fmt: skip
            for workers in args.workers:
                seconds = time_pass(dataset, args.batch_size, workers, tokenizer.pad_token_id)
                rows.append({
                    "benchmark": f"load+collate, {setting}",
                    "image_size": args.image_size,
                    "batch_size": args.batch_size,
                    "workers": workers,
                    "torch_threads": torch.get_num_threads(),
                    "samples": len(dataset),
                    "seconds": round(seconds, 4),
                    "samples_per_s": round(len(dataset) / seconds, 1) if seconds > 0 else float("inf"),
                })
    return rows


def format_table(rows: list[Row]) -> str:
    columns = list(dict.fromkeys(key for r in rows for key in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256, help="records (one image each) in the data set")
    parser.add_argument("--image-size", type=int, default=336, help="side of the images and of the transform output")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--num-image-tokens", type=int, default=576, help="image tokens per image (576: LLaVA-1.5)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/benchmarks/data_loading.json", help="where to write the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    rows = loading_rows(args)
    print(format_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
