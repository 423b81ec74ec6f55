"""`spatial-mllm data ...`: making and checking data sets."""

from __future__ import annotations

import argparse

from .check import register_check
from .tokenizer import register_tokenizer
from .world.make import make_world


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make and check data sets")
    data_subparsers = data.add_subparsers(dest="data_command", required=True)
    _register_make_world(data_subparsers)
    register_check(data_subparsers)
    register_tokenizer(data_subparsers)


def _register_make_world(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser(
        "make-world",
        help="generate the built-in spatial world (images, LLaVA JSON, evaluation and POPE files)",
        description="Generate the built-in spatial world into a folder; docs/world.md describes its files.",
    )
    parser.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--train", type=int, default=3000, help="train images (default 3000)")
    parser.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--holdout", type=int, default=300, help="compositional hold-out images (default 300)")
    parser.add_argument(
        "--canvas", type=int, default=96,
        help="image side in pixels (default 96: with 12-pixel ViT patches, as the demo uses, an 8x8 grid)",
    )
    parser.add_argument("--min-objects", type=int, default=2, help="fewest objects per scene (default 2)")
    parser.add_argument("--max-objects", type=int, default=5, help="most objects per scene (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing world folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_make_world)


def _make_world(args: argparse.Namespace) -> int:
    manifest = make_world(
        args.out,
        seed=args.seed,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        n_holdout=args.holdout,
        canvas=args.canvas,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    print(f"world written to {args.out}: {counts} images")
    return 0
