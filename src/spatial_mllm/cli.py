"""`spatial-mllm` command line. Each area registers its own subcommands, so this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Before torch loads OpenMP (GNU libgomp in torch's Linux wheels): idle threads spin briefly, then sleep. Measured on
# the 2-core machine, demo stage-2 steps: libgomp's default spin (300k) was 5x slower whenever another process kept
# a core busy; no spin (OMP_WAIT_POLICY=PASSIVE) was 1.45x slower than the default on an idle machine, each tiny
# kernel waking its threads; 10k is within 1.1x of the default idle and 1.4x of PASSIVE under load.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Modules exposing `register(subparsers)`; each subcommand sets `func` to a callable taking the parsed args.
COMMAND_MODULES = (
    "spatial_mllm.data.commands",
    "spatial_mllm.training.commands",
    "spatial_mllm.evaluation.commands",
    "spatial_mllm.serving.commands",
    "spatial_mllm.weights.commands",
    "spatial_mllm.demo.commands",
    "spatial_mllm.diagnostics.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spatial-mllm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # User-facing problems (bad file, bad record, bad option) end with their message, not a traceback.
        # the full command, nested ones included (`data check`: dest "data_command")
        name = " ".join([args.command] + [value for key, value in vars(args).items() if key.endswith("_command")])
        print(f"spatial-mllm {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
