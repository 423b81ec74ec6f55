"""Benchmark every registered projector at paper scale (CLIP ViT-L/14-336 -> Vicuna-7B width).

For each projector: parameters, GFLOPs per image (torch.utils.flop_counter on a batch of 1, counted on the meta
device: matmuls, convolutions and attention only; norms, pooling and activations are not counted), output tokens,
CPU latency per image (median over repetitions) in fp32 and in bf16 autocast at batch 1 and batch 8, and the prefill
FLOPs those tokens cost a 7B LLM, estimated as 2 * 6.7e9 * tokens (2 FLOPs per parameter per token; attention
ignored). Ratios are against LLaVA-1.5's mlp2x_gelu.

    python benchmarks/projectors.py [--quick] [--out runs/bench/projectors.json] [--only saep ldpv2]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from spatial_mllm.projectors import PROJECTORS, Projector, VisionGeometry, build_projector

VISION = VisionGeometry(width=1024, grid=24, num_layers=24)
LLM_WIDTH = 4096
LLM_PARAMS = 6.7e9
BASELINE = "mlp2x_gelu"
BATCHES = (1, 8)
PRECISIONS = ("fp32", "bf16")


def features(projector: Projector, batch: int, device: str = "cpu") -> list[torch.Tensor]:
    n = projector.vision.grid**2
    return [torch.randn(batch, n, projector.vision.width, device=device) for _ in projector.feature_layers]


def count_gflops(name: str) -> float:
    with torch.device("meta"):
        projector = build_projector(name, VISION, LLM_WIDTH)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        projector(features(projector, 1, device="meta"))
    return counter.get_total_flops() / 1e9


def latency_ms_per_image(projector: Projector, batch: int, precision: str, warmup: int, reps: int) -> float:
    inputs = features(projector, batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + reps):
            start = time.perf_counter()
            projector(inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def measure(name: str, warmup: int, reps: int) -> dict:
    gflops = count_gflops(name)
    torch.manual_seed(0)
    projector = build_projector(name, VISION, LLM_WIDTH).eval()
    result = {
        "params": sum(p.numel() for p in projector.parameters()),
        "gflops_per_image": gflops,
        "tokens": projector.num_tokens,
        "llm_prefill_gflops": 2 * LLM_PARAMS * projector.num_tokens / 1e9,
        "latency_ms_per_image": {
            precision: {str(b): latency_ms_per_image(projector, b, precision, warmup, reps) for b in BATCHES}
            for precision in PRECISIONS
        },
    }
    del projector
    gc.collect()  # LLaVA-SP holds ~3.7 GB of fp32 weights: free them before building the next one
    return result


def add_ratios(results: dict[str, dict]) -> None:
    base = results[BASELINE]
    for result in results.values():
        result["vs_" + BASELINE] = {
            "params": result["params"] / base["params"],
            "gflops_per_image": result["gflops_per_image"] / base["gflops_per_image"],
            "tokens": result["tokens"] / base["tokens"],
            "llm_prefill_gflops": result["llm_prefill_gflops"] / base["llm_prefill_gflops"],
            "latency_fp32_b1": result["latency_ms_per_image"]["fp32"]["1"]
            / base["latency_ms_per_image"]["fp32"]["1"],
        }


def markdown_table(results: dict[str, dict]) -> str:
    def cell(value: float, ratio: float, fmt: str) -> str:
        return f"{value:{fmt}} ({ratio:.2f}x)"

    header = (
        "| projector | params (M) | GFLOPs/img | tokens | fp32 b1 ms | fp32 b8 ms/img | bf16 b1 ms | bf16 b8 ms/img "
        "| 7B prefill GFLOPs |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, r in results.items():
        ratio, lat = r["vs_" + BASELINE], r["latency_ms_per_image"]
        rows.append(
            f"| {name} | {cell(r['params'] / 1e6, ratio['params'], '.2f')} "
            f"| {cell(r['gflops_per_image'], ratio['gflops_per_image'], '.2f')} | {r['tokens']} "
            f"| {cell(lat['fp32']['1'], ratio['latency_fp32_b1'], '.1f')} | {lat['fp32']['8']:.1f} "
            f"| {lat['bf16']['1']:.1f} | {lat['bf16']['8']:.1f} "
            f"| {cell(r['llm_prefill_gflops'], ratio['llm_prefill_gflops'], '.0f')} |"
        )
    return "\n".join([header, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/projectors.json"), help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs instead of 2 and 7")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"projectors to run ({BASELINE} is always run)")
    args = parser.parse_args()

    unknown = sorted(set(args.only or ()) - set(PROJECTORS.names()))
    if unknown:
        parser.error(f"unknown projector(s) {unknown}; registered: {', '.join(PROJECTORS.names())}")
    # The baseline first, so that one-time library warm-up does not land on the projectors it is compared with.
    others = [n for n in (args.only or PROJECTORS.names()) if n != BASELINE]
    names = [BASELINE, *sorted(set(others))]
    warmup, reps = (1, 3) if args.quick else (2, 7)

    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = measure(name, warmup, reps)
        print(f"{name}: done in {time.perf_counter() - start:.0f}s", flush=True)
    add_ratios(results)

    table = markdown_table(results)
    print(table)
    settings = {
        "vision": {"width": VISION.width, "grid": VISION.grid, "num_layers": VISION.num_layers},
        "llm_width": LLM_WIDTH,
        "llm_prefill_formula": f"2 * {LLM_PARAMS:g} * tokens FLOPs",
        "flops_counted": "torch.utils.flop_counter.FlopCounterMode, batch 1: matmul, conv, attention",
        "warmup": warmup,
        "reps": reps,
        "statistic": "median latency per image (batch time / batch)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "projectors": results, "table": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
