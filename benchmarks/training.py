"""Where a demo stage-2 step's time goes: samples/s, achieved GFLOP/s and their share of the machine's bf16 matmul
peak, measured side by side in one run.

    .venv/bin/python benchmarks/training.py [--plan default|quick] [--steps 12] [--images 640] [--threads 2]
        [--json runs/benchmarks/training.json]

Setup, as the demo has it: a built-in world of --images train images, the shipped ViT and LLM (with the LLM's
phrase tokenizer), the mlp2x_gelu projector, the frozen ViT's features
cached once, and the stage-2 data (conversations mixed with detailed descriptions) read through the processor.
Each variant then runs --steps optimiser steps of the plan's stage-2 batch through the engine's own pieces
(`prepare_model`, the optimizer, the sampler, the collator, `accumulate_gradients`), timing per step:
  data       the DataLoader's next batch (template, tokenisation, labels, feature lookup, collation)
  forward    forward + backward (the engine's accumulate_gradients), the loss's matmuls
  optimizer  AdamW step and zero_grad
FLOPs per step are counted exactly by torch's FlopCounterMode on the step's real batch (matmuls, attention);
"useful" GFLOP/s scale them to the tokens that are not padding. The peak is the best GFLOP/s of a large square
bf16 matmul on the same threads, measured in the same run.

Variants: "as before" (random batches, bf16 autocast, transformers' default sdpa attention), "length-grouped"
(data.group_by_length), "+ eager attention" (model.attn_implementation=eager as well), "+ lengths padded to 16"
(data.pad_to_multiple_of=16 as well: how the demo now trains) and "eager, fp32" (the same without autocast), so
that before and after compare in one run on one machine state. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from spatial_mllm.demo import DEFAULT, QUICK
from spatial_mllm.demo.encoders.shipped import shipped_encoder
from spatial_mllm.demo.run import instruct_mix, stage_config
from spatial_mllm.demo.world import make_world
from spatial_mllm.demo.world.make import split_files
from spatial_mllm.data.dataset import LlavaDataset
from spatial_mllm.model import build_model
from spatial_mllm.training.batches import MicroBatchSampler, move_batch
from spatial_mllm.training.engine import accumulate_gradients, make_accelerator, make_collator, make_optimizer, prepare_model
from spatial_mllm.training.feature_cache import cache_vision_features
from spatial_mllm.training.feature_dataset import CachedFeatureDataset

BEFORE = {"model.attn_implementation": "sdpa", "data.pad_to_multiple_of": None}
EAGER = {"data.group_by_length": True, "model.attn_implementation": "eager"}
VARIANTS = {
    "as before": {"data.group_by_length": False, **BEFORE},
    "length-grouped": {**BEFORE, "data.group_by_length": True},
    "+ eager attention": {**EAGER, "data.pad_to_multiple_of": None},
    "+ lengths padded to 16": {**EAGER, "data.pad_to_multiple_of": 16},  # the demo's
    "eager, fp32 (no autocast)": {**EAGER, "data.pad_to_multiple_of": 16, "optimisation.mixed_precision": "no"},
}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a size x size x size matmul in `dtype`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def setup(plan, root: Path, images: int, seed: int):
    """A demo-shaped base model folder, the stage-2 dataset on cached features, and its config maker."""
    world = root / "world"
    make_world(world, seed=seed, n_train=images, n_val=8, n_test=8, n_holdout=8, progress=False)
    vit, llm = shipped_encoder("vit"), shipped_encoder("llm")
    torch.manual_seed(seed)
    model, processor = build_model(str(vit), str(llm), str(llm), "mlp2x_gelu")
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    paths = [json.loads(line)["image"] for line in (world / split_files("train")["captions"]).read_text().splitlines()]
    features = cache_vision_features(model.vision_tower, paths, processor.image_transform, model.vision_feature_layers,
                                     root / "features.safetensors", image_root=world, dtype="float32")
    mix = instruct_mix(world, root)

    def config_for(overrides: dict, out: Path):
        config = stage_config("instruct", plan, out, mix, world, seed, **{"stage.init_from": root / "base"})
        for key, value in overrides.items():
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
        return config.validate()

    processor.use_template("vicuna_v1")
    dataset = CachedFeatureDataset(LlavaDataset(mix, world, processor, load_images=False), features,
                                   model.vision_feature_layers)
    return config_for, dataset, processor


def measure(config, dataset, processor, steps: int) -> dict:
    accelerator = make_accelerator(config)
    model, _, _ = prepare_model(config)
    opt = config.optimisation
    optimizer, _ = make_optimizer(model, config, steps)
    lengths = dataset.lengths if config.data.group_by_length else None
    sampler = MicroBatchSampler(len(dataset), opt.global_batch_size, opt.micro_batch_size, 1, 0, opt.seed,
                                lengths=lengths)
    batches = iter(DataLoader(dataset, batch_sampler=sampler,
                              collate_fn=make_collator(processor, config.data.pad_to_multiple_of)))
    model.train()
    times = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    tokens = {"real": 0, "padded": 0}
    flops = 0.0
    for step in range(steps + 1):  # the first step warms up and is not counted
        started = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        if step == 1:  # exact FLOPs of one representative step, counted apart from the timed ones
            with FlopCounterMode(display=False) as counter:
                accumulate_gradients(accelerator, model, iter([batch]), config)
            optimizer.zero_grad(set_to_none=True)
            flops_per_padded_token = counter.get_total_flops() / batch["input_ids"].numel()
        computed_start = time.perf_counter()
        accumulate_gradients(accelerator, model, iter([move_batch(batch, accelerator.device)]), config)
        computed = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if step:
            times["data"] += loaded - started
            times["forward_backward"] += computed - computed_start
            times["optimizer"] += done - computed
            tokens["real"] += int(batch["attention_mask"].sum())
            tokens["padded"] += batch["input_ids"].numel()
    flops = flops_per_padded_token * tokens["padded"]
    total = sum(times.values())
    return {
        "samples_per_s": steps * opt.global_batch_size / total,
        "step_ms": 1000 * total / steps,
        **{f"{part}_ms": 1000 * seconds / steps for part, seconds in times.items()},
        "padding_fraction": 1 - tokens["real"] / tokens["padded"],
        "tokens_per_sample": tokens["real"] / (steps * opt.global_batch_size),
        "gflop_per_s": flops / total / 1e9,
        "useful_gflop_per_s": flops * tokens["real"] / tokens["padded"] / total / 1e9,
    }


def format_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for r in rows for key in r))
    cells = [[f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=["default", "quick"], default="default")
    parser.add_argument("--steps", type=int, default=12, help="timed optimiser steps per variant")
    parser.add_argument("--images", type=int, default=640, help="train images of the benchmark's world")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks/training.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.images < 64:
        parser.error("--steps must be at least 1 and --images at least 64")
    torch.set_num_threads(args.threads)
    plan = DEFAULT if args.plan == "default" else QUICK
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_for, dataset, processor = setup(plan, Path(tmp), args.images, args.seed)
        for name, overrides in VARIANTS.items():
            result = measure(config_for(overrides, Path(tmp) / name.replace(" ", "_")), dataset, processor, args.steps)
            result["share_of_bf16_peak"] = result["gflop_per_s"] / peak["bf16"]
            rows.append({"variant": name, **result})
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"bf16 matmul peak {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s ({args.threads} threads)")
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"plan": args.plan, "threads": args.threads, "steps": args.steps,
                                     "matmul_peak_gflop_per_s": peak, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
