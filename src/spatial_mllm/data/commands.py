"""`spatial-mllm data ...`: making and checking data sets (argument parsing and printing only)."""

from __future__ import annotations

import argparse

from ..model.chat_templates import template_names


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make and check data sets")
    data_subparsers = data.add_subparsers(dest="data_command", required=True)
    _register_make_world(data_subparsers)
    _register_check(data_subparsers)
    _register_tokenizer(data_subparsers)


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
    from ..demo.world.make import make_world

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


def _register_check(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser("check", help="report every problem of a LLaVA JSON file without training")
    parser.add_argument("file", help="LLaVA JSON file (a list of records)")
    parser.add_argument("--images", help="image folder the records' paths are relative to (default: the file's folder)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model folder: also render, tokenise and verify each record with its processor")
    source.add_argument("--tokenizer", help="tokenizer folder: the same, with --template and --num-image-tokens")
    parser.add_argument("--template", choices=template_names(),
                        help="conversation template (default: the model's; with --tokenizer, vicuna_v1)")
    parser.add_argument("--num-image-tokens", type=int, default=1,
                        help="tokens per image, with --tokenizer (default 1; needed for --max-length)")
    parser.add_argument("--max-length", type=int, help="also report records that cannot fit this many tokens")
    parser.add_argument("--overlong", choices=["truncate", "drop"], default="truncate")
    parser.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from .check import check_file, processor_for_checks

    processor = None
    if args.model or args.tokenizer:
        processor, note = processor_for_checks(args.model, args.tokenizer, args.template, args.num_image_tokens)
        if note:
            print(f"note: {note}")
    result = check_file(args.file, args.images, processor, args.max_length, args.overlong, progress=True)
    for problem in result.problems:
        print(problem)
    print(result.summary())
    return 0 if result.ok else 1


def _register_tokenizer(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser(
        "tokenizer", help="train the built-in world's tokenizer (byte-level BPE, <image>, vicuna chat template)"
    )
    parser.add_argument("--world", required=True, help="folder of a generated world (LLaVA JSON / JSONL files)")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer to (new or empty)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (all of it)")
    parser.set_defaults(func=_tokenizer)


def _tokenizer(args: argparse.Namespace) -> int:
    from ..demo.tokenizer import train_world_tokenizer, world_texts
    from ..files import check_output

    check_output(args.out, "--out", inputs={"--world": args.world}, overwrite=args.overwrite, folder=True)
    tokenizer = train_world_tokenizer(world_texts(args.world), args.out, vocab_size=args.vocab_size)
    print(f"saved a tokenizer of {len(tokenizer)} tokens to {args.out}")
    return 0
