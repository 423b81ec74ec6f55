"""`spatial-mllm import-llava` and `spatial-mllm export-llava`: official LLaVA / LLaVA-SP releases in and out."""

from __future__ import annotations

import argparse

import torch

from ..projectors import PROJECTORS
from .llava_release import USUAL_VISION_TOWER

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> None:
    importer = subparsers.add_parser(
        "import-llava",
        help="turn an official LLaVA-1.5 or LLaVA-SP release (LoRA or full) into a model folder",
        description="Read a LLaVA-1.5 / LLaVA-SP release folder (LoRA over --model-base, or full) and write an "
        "ordinary model folder (LoRA merged, processor, vicuna_v1 chat template) that eval, chat, serve, train and "
        "lmms-eval load. The projector variant is read from the weight names.",
    )
    importer.add_argument("--model-path", required=True, metavar="REL", help="the release folder (config.json, weights)")
    importer.add_argument("--model-base", metavar="BASE",
                          help="for a LoRA release: the LLM folder its adapter was trained over (lmsys/vicuna-7b-v1.5)")
    importer.add_argument("--projector", choices=PROJECTORS.names(), metavar="NAME",
                          help="the projector you expect; a release holding another is refused")
    importer.add_argument("--vision-tower", metavar="NAME_OR_DIR",
                          help=f"the CLIP to use instead of the release's mm_vision_tower (usually {USUAL_VISION_TOWER})")
    importer.add_argument("--out", required=True, help="folder to create")
    importer.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    importer.add_argument("--keep-lora", action="store_true",
                          help="keep the adapter beside the model instead of merging it (as LoRA training runs do)")
    importer.add_argument("--dtype", choices=DTYPES, help="dtype of the written model (default: the release's)")
    importer.set_defaults(func=_import)

    exporter = subparsers.add_parser(
        "export-llava",
        help="write a model folder in LLaVA's layout, for LLaVA's and LLaVA-SP's own scripts",
        description="Write LLaVA's full layout (config.json, model.safetensors, tokenizer, vision_tower/), or with "
        "--lora the LoRA layout (adapter, non_lora_trainables.bin, base/) of a folder that keeps its adapter.",
    )
    exporter.add_argument("--model", required=True, help="a model folder of this toolkit")
    exporter.add_argument("--out", required=True, help="folder to create")
    exporter.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    exporter.add_argument("--lora", action="store_true", help="LLaVA's LoRA layout (the folder must hold an adapter)")
    exporter.set_defaults(func=_export)


def _import(args: argparse.Namespace) -> int:
    from .llava_import import import_llava

    result = import_llava(
        args.model_path, args.out, model_base=args.model_base, projector=args.projector,
        vision_tower=args.vision_tower, keep_lora=args.keep_lora, dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
    )  # fmt: skip
    lora = {"lora": "LoRA adapter kept beside it" if result.kept_lora else "LoRA merged", "full": "full release"}
    print(
        f"imported a {result.projector} model ({result.num_image_tokens} visual tokens, {result.parameters:,} "
        f"parameters, {str(result.dtype).removeprefix('torch.')}; {lora[result.kind]}; vision tower "
        f"{result.vision_tower}; tokenizer from {result.tokenizer_from}) into {result.out_dir}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .llava_export import export_llava

    result = export_llava(args.model, args.out, lora=args.lora, overwrite=args.overwrite)
    print(f"exported the {result.projector} model in LLaVA's {result.layout} layout to {result.out_dir}")
    if result.name_hint:
        print(f"note: {result.name_hint}")
    return 0
