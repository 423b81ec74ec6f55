"""Importing a release at the official shapes: time, peak memory and sizes of `spatial-mllm import-llava`.

    .venv/bin/python benchmarks/import_llava.py [--llm-layers 2] [--vision-layers 2] [--variants llava_sp_pooling mlp2x_gelu]
        [--json runs/benchmarks/import_llava.json]

No release can be downloaded here, so each one is synthesised with the released shapes and formats: a LoRA release
(adapter r 128 / alpha 256 on the 7 Llama linear layers, `non_lora_trainables.bin` in bf16 under the official names,
LLaVA's config.json) over a Vicuna-7B-shaped base (width 4096, 11008, 32 heads, vocabulary 32000; fp16 `.bin` shards
+ index with `inv_freq`), and a CLIP ViT-L/14-336-shaped tower (width 1024, 24x24 grid). Only the layer counts are
cut (--llm-layers of 32, --vision-layers of 24), so the projector (785M parameters for LLaVA-SP), the embeddings and
each layer have their real sizes; time and memory of the layers scale with their count. The import runs as a user
runs it, in a child process (`spatial_mllm.cli.main`), which reports its own peak resident memory.

Prints one table and writes its rows as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

WIDTH, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 32000
VISION_WIDTH, SPATIAL_WIDTH, GRID = 1024, 512, 24
LORA_R, LORA_ALPHA = 128, 256
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_fields(layers: int) -> dict:
    return {"hidden_size": WIDTH, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "tie_word_embeddings": False, "rope_theta": 10000.0}  # fmt: skip


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def make_base(folder: Path, layers: int) -> None:
    folder.mkdir()
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**llama_fields(layers))).state_dict().items()}
    head_dim = WIDTH // HEADS
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    weight_map = {}
    for index, prefix in enumerate(["model.embed_tokens", *[f"model.layers.{i}." for i in range(layers)], "lm_head|model.norm"]):
        shard = f"pytorch_model-{index + 1:05d}-of-{layers + 2:05d}.bin"
        names = [n for n in shapes if any(n.startswith(p) for p in prefix.split("|"))]
        tensors = {n: (torch.randn(shapes[n], dtype=torch.float16) * 0.02) for n in names}
        if prefix.startswith("model.layers."):
            tensors[f"{prefix}self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        torch.save(tensors, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    write_json(folder / "pytorch_model.bin.index.json", {"weight_map": weight_map})
    write_json(folder / "config.json", {"model_type": "llama", "torch_dtype": "float16", **llama_fields(layers)})
    model = io.BytesIO()
    corpus = ["A chat between a curious user and an artificial intelligence assistant. USER: What is left? ASSISTANT:"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def make_clip(folder: Path, layers: int) -> None:
    config = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=4096, num_hidden_layers=layers,
                              num_attention_heads=16, image_size=336, patch_size=14)  # fmt: skip
    CLIPVisionModel(config).half().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)


def official_projector(variant: str) -> dict[str, torch.Tensor]:
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=torch.bfloat16) * 0.01

    state = {"model.mm_projector.0.weight": draw(WIDTH, VISION_WIDTH), "model.mm_projector.0.bias": draw(WIDTH),
             "model.mm_projector.2.weight": draw(WIDTH, WIDTH), "model.mm_projector.2.bias": draw(WIDTH)}  # fmt: skip
    if variant == "mlp2x_gelu":
        return state
    for size in (4, 8, 12, 16, 20, 24):
        name = f"model.conv_{size}{'.1' if variant == 'llava_sp_pooling' and size != GRID else ''}.weight"
        state[name] = draw(SPATIAL_WIDTH, VISION_WIDTH, size, size)
    state["model.conv_CM.weight"] = draw(SPATIAL_WIDTH, VISION_WIDTH, 16, 16)
    for role in ("query", "key", "value"):
        for index, shape in ((0, (SPATIAL_WIDTH,)), (1, (SPATIAL_WIDTH, SPATIAL_WIDTH))):
            state[f"model.{role}_projector.{index}.weight"] = draw(*shape)
            state[f"model.{role}_projector.{index}.bias"] = draw(SPATIAL_WIDTH)
    state["model.conv_linear.1.weight"] = draw(WIDTH, 2 * SPATIAL_WIDTH)
    if variant == "llava_sp_cropping":
        state["model.conv_linear.1.bias"] = draw(WIDTH)
    return state


def make_release(folder: Path, variant: str, layers: int, clip: Path) -> None:
    folder.mkdir()
    adapter = {}
    for i in range(layers):
        for name in TARGETS:
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            fan_in = INTERMEDIATE if name == "down_proj" else WIDTH
            fan_out = INTERMEDIATE if name in ("gate_proj", "up_proj") else WIDTH
            key = f"base_model.model.model.layers.{i}.{block}.{name}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(LORA_R, fan_in, dtype=torch.bfloat16) * 0.01
            adapter[f"{key}.lora_B.weight"] = torch.randn(fan_out, LORA_R, dtype=torch.bfloat16) * 0.01
    save_file(adapter, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", {"peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA,
                                                "lora_dropout": 0.05, "bias": "none", "target_modules": list(TARGETS),
                                                "task_type": "CAUSAL_LM", "modules_to_save": None})  # fmt: skip
    torch.save({f"base_model.model.{k}": v for k, v in official_projector(variant).items()},
               folder / "non_lora_trainables.bin")
    write_json(folder / "config.json", {
        "model_type": "llava_llama", "torch_dtype": "bfloat16", **llama_fields(layers), "mm_vision_tower": str(clip),
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION_WIDTH, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    })  # fmt: skip


# The command as users run it, then its own peak resident memory (KiB on Linux) on the last line.
CHILD = (
    "import resource, sys; from spatial_mllm.cli import main; code = main(sys.argv[1:]); "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
)


def size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["llava_sp_pooling", "mlp2x_gelu"])
    parser.add_argument("--json", default="runs/benchmarks/import_llava.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_base(root / "base", args.llm_layers)
        make_clip(root / "clip", args.vision_layers)
        for variant in args.variants:
            release = root / f"release-{variant}"
            make_release(release, variant, args.llm_layers, root / "clip")
            out = root / f"out-{variant}"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, "import-llava", "--model-path", str(release),
                                   "--model-base", str(root / "base"), "--projector", variant, "--out", str(out)],
                                  capture_output=True, text=True)  # fmt: skip
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"import of {variant} failed:\n{done.stderr[-2000:]}")
            *printed, peak = done.stdout.strip().splitlines()
            rows.append({
                "variant": variant, "llm_layers": args.llm_layers, "vision_layers": args.vision_layers,
                "release_gb": round(size_gb(release) + size_gb(root / "base") + size_gb(root / "clip"), 2),
                "output_gb": round(size_gb(out), 2), "seconds": round(seconds, 1),
                "peak_rss_gb": round(int(peak.split()[-1]) / 2**20, 2), "printed": printed[-1],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    columns = ["variant", "llm_layers", "vision_layers", "release_gb", "output_gb", "seconds", "peak_rss_gb"]
    print("\n" + " | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
