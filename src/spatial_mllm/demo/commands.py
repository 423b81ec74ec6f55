"""`spatial-mllm demo`: argument parsing and printing for the demo's run."""

from __future__ import annotations

import argparse
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projectors", nargs="+", default=list(DEMO_PROJECTORS),
                        help=f"registered projector names (default: {' '.join(DEMO_PROJECTORS)})")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    progress = logging.StreamHandler(sys.stdout)
    progress.setFormatter(logging.Formatter("[demo] %(message)s"))
    demo_logger = logging.getLogger("spatial_mllm.demo")
    demo_logger.addHandler(progress)
    demo_logger.setLevel(logging.INFO)
    try:
        report = run_demo(Path(args.out), QUICK if args.quick else DEFAULT, args.seed, tuple(args.projectors))
    finally:
        demo_logger.removeHandler(progress)
    print((report / "report.md").read_text())
    return 0
