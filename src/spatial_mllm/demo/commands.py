"""`spatial-mllm demo` and `spatial-mllm world-encoders`: argument parsing and printing for the demo's run and for
remaking the built-in world's shipped encoders."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .plan import DEFAULT, DEMO_PROJECTORS, QUICK
from .run import __doc__ as RUN_DOC
from .run import run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train and compare projectors end to end on the built-in world",
                                   description=RUN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo); reruns reuse its cache")
    parser.add_argument("--quick", action="store_true", help="the small setting used by the tests (about 2 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the first training seed")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat the comparison with this many training seeds (seed, seed+1, ...) on the same "
                             "world; the report gives means and spreads across seeds")
    parser.add_argument("--projectors", nargs="+", default=list(DEMO_PROJECTORS),
                        help=f"registered projector names (default: {' '.join(DEMO_PROJECTORS)})")
    parser.add_argument("--train-encoders", action="store_true",
                        help="pretrain the world's ViT and LLM in this run (cached) instead of using the shipped ones")
    parser.add_argument("--no-blind", action="store_true", help="skip the blind control (saves one training run)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="arms trained at once, each in its own process with its share of the torch threads "
                             "(default: one per CPU core, 1 with a GPU; 1: one after another, with progress bars)")
    parser.set_defaults(func=_demo)
    _register_world_encoders(subparsers)


def _demo(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    progress = logging.StreamHandler(sys.stdout)
    progress.setFormatter(logging.Formatter("[demo] %(message)s"))
    demo_logger = logging.getLogger("spatial_mllm.demo")
    demo_logger.addHandler(progress)
    demo_logger.setLevel(logging.INFO)
    try:
        report = run_demo(Path(args.out), QUICK if args.quick else DEFAULT, args.seed, tuple(args.projectors),
                          seeds=args.seeds, train_encoders=args.train_encoders, blind=not args.no_blind,
                          jobs=args.jobs)
    finally:
        demo_logger.removeHandler(progress)
    print((report / "report.md").read_text())
    return 0


def _register_world_encoders(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "world-encoders",
        help="pretrain the built-in world's ViT (dense) or LLM (scene descriptions and grids), as shipped",
        description=(
            "Remake an encoder the demo ships: `vit` trains a CLIPVisionModel whose every patch names the colour, "
            "shape, size and centre of the object under it; `llm` trains a Llama (and its tokenizer) to answer the "
            "world's questions from a written scene description and from the scene as grid cells in place of the "
            "image. Both use a pretraining world of their own seed (train split only). With the defaults and the "
            "--threads the shipped manifest records this reproduces the shipped weights; options override the "
            "config (e.g. --set steps=500)."
        ),
    )
    parser.add_argument("encoder", choices=("vit", "llm"))
    parser.add_argument("--out", required=True, help="folder to write (model, processor or tokenizer, pretraining.json)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override config fields (VitPretrainConfig / DescriptionLlmConfig), JSON values")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results are deterministic for a given thread count; default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=_world_encoders)


def _world_encoders(args: argparse.Namespace) -> int:
    import torch

    from ..files import check_output
    from .encoders.dense_vit import VitPretrainConfig, pretrain_vit
    from .encoders.description_llm import DescriptionLlmConfig, pretrain_description_llm

    check_output(args.out, "--out", overwrite=args.overwrite, folder=True)
    config_class, pretrain = ((VitPretrainConfig, pretrain_vit) if args.encoder == "vit"
                              else (DescriptionLlmConfig, pretrain_description_llm))
    options = _parse_settings(args.set, config_class)
    torch.set_num_threads(args.threads)
    result = pretrain(args.out, log=print, **options)
    print(json.dumps(result.metrics, indent=1))
    return 0


def _parse_settings(settings: list[str], config_class) -> dict:
    import dataclasses

    fields = {field.name for field in dataclasses.fields(config_class)}
    options = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {setting!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {setting!r}: {value!r} is not a JSON value (numbers as 3, lists as [2,3])") from None
        options[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return options
