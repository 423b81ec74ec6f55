"""`spatial-mllm diagnose`: argument parsing and printing for `diagnose_vision` / `diagnose_llm`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import check_output, write_json
from .diagnose import diagnose_llm, diagnose_vision, read_world_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="probe a ViT's patches and an LLM's text-only accuracy on the built-in world",
        description=(
            "For a ViT folder: linear probes (fit on the world's train images, scored on --split) of the colour, "
            "shape and size of each object from the patch under its centre, per hidden state the projectors read, "
            "beside the majority class. For an LLM folder (with its tokenizer): accuracy on the split's questions "
            "from text alone, with the written scene description in place of the image and without it, and "
            "whether its attribute replies name the object asked about or another object of the scene."
        ),
    )
    parser.add_argument("--world", required=True, help="a world folder (spatial-mllm data make-world)")
    parser.add_argument("--vision", help="a CLIP/SigLIP vision folder or hub name to probe")
    parser.add_argument("--llm", help="a causal LM folder (model + tokenizer) to ask the questions")
    parser.add_argument("--layers", type=int, nargs="+", help="hidden-state indices (default: those projectors read)")
    parser.add_argument("--split", default="test", choices=("val", "test", "holdout"))
    parser.add_argument("--fit-images", type=int, default=1000, help="train images the probes are fit on")
    parser.add_argument("--images", type=int, default=300, help="split images probed / asked about")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=_diagnose)


def _diagnose(args: argparse.Namespace) -> int:
    if not (args.vision or args.llm):
        raise ValueError("give --vision, --llm or both")
    world = read_world_path(args.world)
    if args.out:
        check_output(args.out, "--out", overwrite=args.overwrite)
    result = {}
    if args.vision:
        result["vision"] = diagnose_vision(args.vision, world, tuple(args.layers) if args.layers else None,
                                           args.fit_images, args.images, args.split)
        _print_probes(result["vision"])
    if args.llm:
        result["llm"] = diagnose_llm(args.llm, world, args.split, args.images)
        _print_text(result["llm"])
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def _print_probes(found: dict) -> None:
    objects = ", ".join(f"{split} {count}" for split, count in found["objects"].items())
    print(f"per-patch probes of {found['vision']} (objects: {objects})")
    print(f"{'hidden state':>12} {'colour':>7} {'shape':>7} {'size':>7}  read by")
    for layer, accuracy in found["layers"].items():
        readers = ", ".join(name for name, layers in found["read_by"].items() if int(layer) in layers) or "-"
        print(f"{layer:>12} {accuracy['color']:>7.1%} {accuracy['shape']:>7.1%} {accuracy['size']:>7.1%}  {readers}")
    majority = found["majority"]
    print(f"{'majority':>12} {majority['color']:>7.1%} {majority['shape']:>7.1%} {majority['size']:>7.1%}")


def _print_text(found: dict) -> None:
    with_text, without = found["with_description"], found["without_description"]
    grids = {name.removeprefix("with_"): found[name] for name in found if name.startswith("with_grid")}
    total = with_text["counts"]["overall"]["total"]
    print(f"text-only accuracy of {found['llm']} on {total} {found['split']} questions"
          + (" (gridN: the scene as N x N grid cells in place of the image)" if grids else ""))
    columns = {"with description": with_text, "without": without, **grids}
    widths = [max(8, len(name) + 1) for name in columns]
    print(f"{'category':>14} " + " ".join(f"{name:>{width}}" for name, width in zip(columns, widths)))

    def row(label: str, kind: str, key: str | None) -> None:
        values = [scores[kind][key] if key else scores[kind] for scores in columns.values()]
        print(f"{label:>14} " + " ".join(f"{value:>{width}.1%}" for value, width in zip(values, widths)))

    for category in sorted(with_text["categories"]):
        row(category, "categories", category)
    row("overall", "overall", None)
    for question_type in sorted(with_text["types"]):
        row(f"format {question_type}", "types", question_type)
    print("attribute replies with the description: right / another object's value / a value not in the scene / "
          "no value, beside the scene guess rate (naming one of the scene's values at random)")
    print(f"{'category':>14} {'questions':>9} {'right':>7} {'other':>7} {'absent':>7} {'none':>7} {'guess':>7}")
    for category, found_binding in found["binding"].items():
        print(f"{category:>14} {found_binding['questions']:>9} {found_binding['right']:>7.1%} "
              f"{found_binding['other_object']:>7.1%} {found_binding['not_in_scene']:>7.1%} "
              f"{found_binding['no_value']:>7.1%} {found_binding['scene_guess_rate']:>7.1%}")
    print(json.dumps({"with_description": with_text["overall"], "without_description": without["overall"],
                      **{f"with_{name}": scores["overall"] for name, scores in grids.items()}}))
