"""LoRA for training: peft layers on the LLM's linear layers, the adapter saved beside the model, and
`merge_lora_folder`, which folds a LoRA run's adapter into the LLM and writes a plain folder (the folder format
and attaching are in model/adapter.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from torch import nn

from ..model.adapter import ADAPTER_CONFIG, ADAPTER_NAME, ADAPTER_WEIGHTS, PEFT_PREFIX, has_lora, merge_lora
from .config import LoraSection

LM_PREFIX = "model.language_model."  # the decoder; the output head (lm_head) is never adapted


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct names (last path component) of the LLM's Linear layers, its output head excluded."""
    lm = model.language_model
    head = lm.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


def target_pattern(model: nn.Module, section: LoraSection) -> str:
    """A regex (peft full-matches it against module names) restricted to the language model, so LoRA never lands
    on the projector or the vision tower."""
    available = linear_layer_names(model)
    if section.target_modules == "all-linear":
        names = available
    elif isinstance(section.target_modules, str):
        raise ValueError(f"lora.target_modules must be 'all-linear' or a list of layer names, got {section.target_modules!r}")
    else:
        names = list(section.target_modules)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"lora.target_modules {unknown} match no Linear layer of the LLM; its Linear layers: {', '.join(available)}"
            )
    return rf"{re.escape(LM_PREFIX)}(.*\.)?({'|'.join(map(re.escape, names))})"


def inject_lora(model: nn.Module, section: LoraSection) -> LoraConfig:
    """Adds untrained LoRA layers (B = 0, so the model's output is unchanged) to the LLM's linear layers, in place."""
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=target_pattern(model, section),
        bias="none",
    )
    inject_adapter_in_model(config, model, ADAPTER_NAME)
    return config


def split_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(base state dict with the plain layer names the model has without LoRA, adapter state dict in peft's
    on-disk naming) from the full state dict of a model carrying LoRA layers."""
    base = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}
    adapter = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return base, {f"{PEFT_PREFIX}{k}": v for k, v in adapter.items()}


def save_adapter(folder: Path, adapter_state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def merge_lora_folder(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Loads a LoRA output folder, merges the adapter into the LLM and writes a plain model folder (with processor
    and the run's facts). The new folder appears whole or not at all; an existing one is replaced only with
    `overwrite`."""
    import json

    from ..files import check_output, write_folder
    from ..model import RUN_INFO_FILE
    from ..model.loading import adapter_is_its_own, load_model_folder, run_info

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("merge --out must be a different folder from --model")
    check_output(out_dir, "merge --out", inputs={"--model": model_dir}, overwrite=overwrite, folder=True)
    model, processor = load_model_folder(model_dir)
    info = run_info(model_dir)
    if not adapter_is_its_own(model_dir, info):
        raise ValueError(f"{model_dir} holds no LoRA adapter of its own ({ADAPTER_CONFIG}); it is already a plain model")
    merge_lora(model)

    def build(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if info:
            files = sorted([p.name for p in staging.iterdir()] + [RUN_INFO_FILE])
            (staging / RUN_INFO_FILE).write_text(json.dumps({**info, "files": files, "merged_from": str(model_dir)}, indent=2))

    # Assembled beside the target and renamed into place (fsynced first), so it appears whole or not at all.
    return write_folder(out_dir, build)


__all__ = [
    "inject_lora",
    "linear_layer_names",
    "merge_lora_folder",
    "save_adapter",
    "split_lora_state_dict",
    "target_pattern",
]
