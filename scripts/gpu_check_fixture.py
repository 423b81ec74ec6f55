"""What scripts/gpu_check.sh trains under FSDP, made without downloads, and the check that its result loads.

    python scripts/gpu_check_fixture.py make OUT [--size paper] [--llm-layers 4] [--projector llava_sp_pooling]
    python scripts/gpu_check_fixture.py load MODEL_DIR WORLD_DIR

`make` writes OUT/world (a small built-in world: images and LLaVA stage-2 JSON), OUT/tokenizer (trained on its
text) and OUT/model: a random-init model folder of benchmarks/paper_scale.py's shapes (the LLM cut to
--llm-layers layers, so that it saves and loads in seconds) with its processor, as `stage.init_from` reads it.
`load` loads a trained folder with from_pretrained (adapter included) and answers one world question greedily;
both print one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paper_scale import SIZES  # noqa: E402  (the benchmark's shapes)

from spatial_mllm.demo.tokenizer import train_world_tokenizer, world_texts  # noqa: E402
from spatial_mllm.demo.world import make_world  # noqa: E402
from spatial_mllm.model import build_model  # noqa: E402


def make(out: Path, size_name: str, llm_layers: int, projector: str, device: torch.device) -> dict:
    started = time.perf_counter()
    size = SIZES[size_name]
    world = out / "world"
    make_world(world, seed=0, n_train=16, n_val=2, n_test=2, n_holdout=2, progress=False)
    tokenizer = train_world_tokenizer(world_texts(world), out / "tokenizer", vocab_size=1024)
    llm = LlamaConfig(**{**size.llm, "num_hidden_layers": llm_layers})
    if len(tokenizer) > llm.vocab_size:
        raise ValueError(f"the world tokenizer has {len(tokenizer)} tokens, more than the LLM's {llm.vocab_size}")
    torch.manual_seed(0)
    with torch.device(device):
        model, processor = build_model(
            CLIPVisionConfig(**size.vision), llm, tokenizer, projector, size.projector_options.get(projector, {}),
            dtype=torch.bfloat16,
        )
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return {
        "model": str(out / "model"),
        "train_json": str(world / "llava_stage2_train.json"),
        "image_folder": str(world),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }


def load(model_dir: Path, world: Path, device: torch.device) -> dict:
    from PIL import Image

    from spatial_mllm.model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor

    started = time.perf_counter()
    model = SpatialMLLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    processor = SpatialMLLMProcessor.from_pretrained(model_dir)
    question = json.loads((world / "eval_test_questions.jsonl").read_text().splitlines()[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["text"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(world / question["image"]).convert("RGB"), text=prompt).to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    return {
        "has_lora": any(".lora_" in name for name, _ in model.named_parameters()),
        "new_tokens": len(new),
        "answer": processor.decode(new, skip_special_tokens=True),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the world, tokenizer and model folder")
    make_parser.add_argument("out", type=Path)
    make_parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    make_parser.add_argument("--llm-layers", type=int, default=4)
    make_parser.add_argument("--projector", default="llava_sp_pooling")
    load_parser = commands.add_parser("load", help="load a trained folder and answer one question")
    load_parser.add_argument("model_dir", type=Path)
    load_parser.add_argument("world", type=Path)
    for sub in (make_parser, load_parser):
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.command == "make":
        if args.out.exists() and any(args.out.iterdir()):
            parser.error(f"{args.out} exists and is not empty; name a new folder")
        result = make(args.out, args.size, args.llm_layers, args.projector, torch.device(args.device))
    else:
        result = load(args.model_dir, args.world, torch.device(args.device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
