"""`export_llava`: one of our model folders in the layouts LLaVA's and LLaVA-SP's own code load, so their
evaluation scripts can run a model trained or imported here.

- full (default): `config.json` (`model_type` "llava_llama", the Llama fields and the `mm_*` keys), `model.safetensors`
  with the LLM under transformers' Llama names and the projector under the official names (`model.mm_projector.*`,
  LLaVA-SP's `model.conv_*`, ...), the tokenizer;
- LoRA (`lora=True`, for a folder that keeps a LoRA adapter): `config.json`, peft's `adapter_config.json` +
  `adapter_model.safetensors` named as LLaVA's causal LM names its layers, `non_lora_trainables.bin` (the projector,
  prefixed `base_model.model.`), and `base/`, the LLM the adapter goes over, for LLaVA's `--model-base`.
Both carry `vision_tower/` (the CLIP and its image processor), named by absolute path in `mm_vision_tower`.
A sentencepiece tokenizer is written as Llama releases ship it (`tokenizer.model` + `tokenizer_config.json`), without
our `<image>` token, which LLaVA does not use (it splits prompts on the text "<image>").
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from ..files import check_output, write_folder
from ..model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor
from ..model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, attach_adapter, merge_lora
from ..model.loading import adapter_is_its_own, load_model_folder, run_info
from .llava_import import SENTENCEPIECE_FILE
from .llava_release import LLAMA_FIELDS, NON_LORA_TRAINABLES
from .official import OFFICIAL_PREFIX, export_official_projector

VISION_FOLDER = "vision_tower"
BASE_FOLDER = "base"
LLAVA_PROJECTORS = ("linear", "mlp2x_gelu", "llava_sp_pooling", "llava_sp_cropping", "llava_sp_pooling_nodfi")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    layout: str  # "full" or "lora"
    projector: str
    name_hint: str | None  # what LLaVA's loader, which dispatches on the folder name, needs of it


def export_llava(model_dir: str | Path, out_dir: str | Path, lora: bool = False, overwrite: bool = False) -> ExportResult:
    """Writes `model_dir` (one of our model folders) in LLaVA's full layout, or its LoRA layout with `lora`, to
    `out_dir` (an existing one is replaced only with `overwrite`). The folder appears whole or not at all."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output(out_dir, "--out", inputs={"--model": model_dir}, overwrite=overwrite, folder=True)
    model, processor = load_model_folder(model_dir, adapter=False)
    has_adapter = adapter_is_its_own(model_dir, run_info(model_dir))
    if lora and not has_adapter:
        raise ValueError(
            f"--lora: {model_dir} holds no LoRA adapter of its own ({ADAPTER_CONFIG}); export it without --lora "
            "(LLaVA's full layout), or import the release with --keep-lora"
        )
    _check_exportable(model)
    if has_adapter and not lora:  # the full layout holds the merged LLM
        attach_adapter(model, model_dir)
        merge_lora(model)
    # LLaVA reads the tower from this path; it is where the folder is being created.
    config = llava_config(model, processor, str(out_dir.resolve() / VISION_FOLDER))
    projector = export_official_projector(model.projector)

    def build(staging: Path) -> None:
        _write_json(staging / "config.json", config)
        if lora:
            _write_adapter(model_dir, staging)
            torch.save({OFFICIAL_PREFIX + k: v.contiguous() for k, v in projector.items()}, staging / NON_LORA_TRAINABLES)
            model.causal_lm().save_pretrained(staging / BASE_FOLDER)
            _write_tokenizer(processor, model, model_dir, staging / BASE_FOLDER)
        else:
            causal_lm = model.causal_lm()
            llm = {k: v.contiguous() for k, v in causal_lm.state_dict().items()}
            for key in getattr(causal_lm, "all_tied_weights_keys", None) or {}:
                llm.pop(key, None)  # a tied output head is the embedding matrix: stored once, as transformers does
            save_file({**llm, **{k: v.contiguous() for k, v in projector.items()}}, staging / "model.safetensors",
                      metadata={"format": "pt"})
        _write_tokenizer(processor, model, model_dir, staging)
        model.vision_tower.model.save_pretrained(staging / VISION_FOLDER)
        processor.image_processor.save_pretrained(staging / VISION_FOLDER)

    write_folder(out_dir, build)
    name = out_dir.name.lower()
    needed = ["llava"] + (["lora"] if lora else [])
    hint = None
    if not all(word in name for word in needed):
        hint = (f"LLaVA's loader dispatches on the folder name: its scripts need {' and '.join(map(repr, needed))} in "
                f"it (rename {out_dir.name} before pointing them at it)")
    return ExportResult(out_dir, "lora" if lora else "full", model.config.projector_type, hint)


def _check_exportable(model: SpatialMLLMForConditionalGeneration) -> None:
    config = model.config
    if config.projector_type not in LLAVA_PROJECTORS:
        raise ValueError(
            f"LLaVA's code has no {config.projector_type} projector; export-llava writes {', '.join(LLAVA_PROJECTORS)}"
        )
    if config.text_config.model_type != "llama":
        raise ValueError(f"LLaVA's LlavaLlamaForCausalLM needs a Llama LLM, this model's is {config.text_config.model_type}")
    if model.vision_tower.config.model_type != "clip_vision_model":
        raise ValueError(f"LLaVA-1.5's vision tower is CLIP, this model's is {model.vision_tower.config.model_type}")


def llava_config(model: SpatialMLLMForConditionalGeneration, processor: SpatialMLLMProcessor, vision_tower: str) -> dict:
    """LLaVA's config.json: the Llama fields and the multimodal keys LLaVA's builder and LLaVA-SP read."""
    text = {k: v for k, v in model.config.text_config.to_dict().items() if k in LLAMA_FIELDS}
    rope = dict(text.pop("rope_parameters", None) or {})
    rope_theta = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",  # LLaVA's own config class (plain "llava" is transformers' other Llava)
        **text,
        # the names transformers 4.37 (LLaVA's) reads
        "rope_theta": rope_theta,
        "rope_scaling": None if rope_type == "default" else {"type": rope_type, **rope},
        "torch_dtype": str(model.dtype).removeprefix("torch."),
        "mm_vision_tower": vision_tower,
        "mm_projector_type": "linear" if model.config.projector_type == "linear" else "mlp2x_gelu",
        "mm_hidden_size": model.vision_tower.geometry.width,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad" if processor.pad_images else "square",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": processor.tokenizer.model_max_length,
        "tokenizer_padding_side": "right",
    }


def _write_adapter(model_dir: Path, staging: Path) -> None:
    """Our adapter (over the whole model, the LLM's decoder at `model.language_model.`) renamed for LLaVA's causal
    LM, whose decoder is `model.`."""
    inner = PEFT_PREFIX + "model.language_model."
    weights = load_file(model_dir / ADAPTER_WEIGHTS)
    outside = sorted(k for k in weights if not k.startswith(inner))
    if outside:
        raise ValueError(f"{model_dir / ADAPTER_WEIGHTS} has LoRA outside the LLM ({outside[:3]}), which LLaVA cannot load")
    renamed = {PEFT_PREFIX + "model." + k.removeprefix(inner): v.contiguous() for k, v in weights.items()}
    # One pattern per adapted layer kind, layer index free: what LLaVA's LlamaModel calls them.
    modules = {k.removeprefix(PEFT_PREFIX).split(".lora_")[0] for k in renamed}
    kinds = sorted({re.escape(re.sub(r"\.\d+\.", ".0.", m)).replace(r"\.0\.", r"\.\d+\.") for m in modules})
    config = LoraConfig.from_pretrained(model_dir)
    config.target_modules = "|".join(kinds)
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(staging)
    save_file(renamed, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _write_tokenizer(processor: SpatialMLLMProcessor, model, model_dir: Path, folder: Path) -> None:
    tokenizer = processor.tokenizer
    if (model_dir / SENTENCEPIECE_FILE).is_file() and model.config.image_token_id >= model.config.text_config.vocab_size:
        # As Llama releases ship it, for LLaVA's slow tokenizer; <image> lies outside the LLM's vocabulary here
        # and would make LLaVA grow the embeddings by a row, so it is left out.
        folder.mkdir(exist_ok=True)
        shutil.copy2(model_dir / SENTENCEPIECE_FILE, folder / SENTENCEPIECE_FILE)
        special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token}
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            **special, "pad_token": None, "model_max_length": tokenizer.model_max_length, "padding_side": "right",
            "clean_up_tokenization_spaces": False,
        })  # fmt: skip
        _write_json(folder / "special_tokens_map.json", special)
    else:
        tokenizer.save_pretrained(folder)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


__all__ = ["ExportResult", "export_llava", "llava_config"]
