"""`spatial-mllm train` and `spatial-mllm merge`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import sys

from .config import load_config, shipped_configs


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train one stage (align or instruct) from a YAML config",
        description="Train one stage. Several processes: accelerate launch [--config_file launch_*.yaml] "
        "-m spatial_mllm.cli train ..., or torchrun --nproc_per_node N -m spatial_mllm.cli train ...",
    )
    train.add_argument("--config", help="a YAML file or the name of a shipped config (see --list-configs)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. optimisation.lr=2e-4 resume=auto")
    train.add_argument("--list-configs", action="store_true", help="list the shipped configs and their paths, then exit")
    train.set_defaults(func=_train)

    merge = subparsers.add_parser(
        "merge", help="fold a LoRA run's adapter into the LLM and write a plain model folder"
    )
    merge.add_argument("--model", required=True, help="output folder of a LoRA training run")
    merge.add_argument("--out", required=True, help="folder for the merged model (created)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    merge.set_defaults(func=_merge)


def _train(args: argparse.Namespace) -> int:
    if args.list_configs:
        for name, path in sorted(shipped_configs().items()):
            kind = "accelerate launch config" if name.startswith("launch_") else "training config"
            print(f"{name:28s} {kind:25s} {path}")
        return 0
    if not args.config:
        raise ValueError("--config is required (a YAML file or a shipped config name; see --list-configs)")
    from .engine import NonFiniteLossError, train

    config = load_config(args.config, args.overrides)
    try:
        output = train(config)
    except NonFiniteLossError as err:
        print(f"spatial-mllm train: {err}", file=sys.stderr)
        return 3
    print(f"trained model written to {output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .lora import merge_lora_folder

    out = merge_lora_folder(args.model, args.out, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0
