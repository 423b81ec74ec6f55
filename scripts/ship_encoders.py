"""Maintainers' step: put a pretrained world encoder into the package (`spatial_mllm/demo/encoders/shipped/`) with
its manifest entry: the command that made it, the environment, its pretraining config and metrics, and the
diagnostics measured on the demo's default world (seed 0).

    spatial-mllm world-encoders vit --out runs/vit --threads 1
    python scripts/ship_encoders.py vit runs/vit --threads 1

--threads records the thread count the folder was made with: the weights are reproducible for that count.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
import transformers

from spatial_mllm.demo.encoders.shipped import ship_encoder
from spatial_mllm.demo.plan import DEFAULT
from spatial_mllm.demo.world import make_world
from spatial_mllm.diagnostics.diagnose import diagnose_llm, diagnose_vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", choices=("vit", "llm"))
    parser.add_argument("folder", help="the folder `spatial-mllm world-encoders` wrote")
    parser.add_argument("--threads", type=int, default=1, help="the --threads it was made with (default 1)")
    parser.add_argument("--world", help="a demo world (seed 0, default sizes); made in a temporary folder if absent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        world = Path(args.world) if args.world else Path(scratch) / "world"
        if not args.world:
            make_world(world, seed=0, progress=False, **DEFAULT.world)
        if args.encoder == "vit":
            diagnostics = diagnose_vision(args.folder, world)
        else:
            diagnostics = diagnose_llm(args.folder, world, "test", DEFAULT.eval_images)
        diagnostics["world"] = f"demo world, seed 0, {DEFAULT.world}"
        diagnostics.pop("vision", None), diagnostics.pop("llm", None)
    environment = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
                   "python": platform.python_version(), "machine": platform.machine()}
    command = f"spatial-mllm world-encoders {args.encoder} --out OUT --threads {args.threads}"
    target = ship_encoder(args.encoder, args.folder, command, environment, diagnostics)
    print(f"shipped {args.encoder} as {target}")


if __name__ == "__main__":
    main()
