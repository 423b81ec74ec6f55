"""LoRA on the LLM's linear layers through peft, the LoRA output folder, and merging LoRA into the LLM.

A LoRA run's output folder holds the full model without LoRA (config.json + model.safetensors, with the trained
projector) and, beside it, the adapter in peft's format (adapter_config.json + adapter_model.safetensors).
transformers loads such a folder as base model + embedded adapter, so `from_pretrained(folder)` gives the trained
model whatever the folder is called; `merge_lora_folder` folds the adapter into the LLM and writes a plain folder.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraSection

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LM_PREFIX = "language_model."
PEFT_PREFIX = "base_model.model."  # peft's files name keys from its PeftModel wrapper


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


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def split_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(base state dict with the plain layer names the model has without LoRA, adapter state dict in peft's
    on-disk naming) from the full state dict of a model carrying LoRA layers."""
    base = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}
    adapter = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return base, {f"{PEFT_PREFIX}{k}": v for k, v in adapter.items()}


def save_adapter(folder: Path, adapter_state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA layer into its base Linear and removes the LoRA modules, in place: afterwards the model has
    the plain architecture and saves as a plain folder. Refuses adapter weights that are not finite."""
    lora_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not lora_layers:
        raise ValueError("the model has no LoRA layers to merge")
    for name, layer in lora_layers:
        layer.merge(safe_merge=True)  # safe_merge: NaN/inf in the merged weight is an error, not a silent result
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    del model.peft_config
    return model


def load_without_adapter(model_dir: Path):
    """The model of a LoRA output folder without its adapter. transformers would attach the adapter it finds
    beside the weights, so load from a view of the folder that leaves the adapter files out."""
    from ..model import SpatialMLLMForConditionalGeneration

    with tempfile.TemporaryDirectory() as view:
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                (Path(view) / path.name).symlink_to(path.resolve())
        return SpatialMLLMForConditionalGeneration.from_pretrained(view)


def attach_adapter(model: nn.Module, model_dir: Path) -> None:
    """Injects the folder's LoRA layers into `model` and loads their weights, refusing any mismatch."""
    config = LoraConfig.from_pretrained(model_dir)
    inject_adapter_in_model(config, model, ADAPTER_NAME)
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(model_dir / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{model_dir / ADAPTER_WEIGHTS} does not fit the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )


def merge_lora_folder(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Loads a LoRA output folder, merges the adapter into the LLM and writes a plain model folder (with processor
    and the run's facts, such as its template). The new folder appears whole or not at all."""
    import shutil

    from ..files import write_folder
    from ..model import RUN_INFO_FILE, SpatialMLLMProcessor
    from ..model.folder import check_model_folder

    model_dir, out_dir = check_model_folder(model_dir), Path(out_dir)
    if not (model_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{model_dir} holds no LoRA adapter ({ADAPTER_CONFIG}); it is already a plain model")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("merge --out must be a different folder from --model")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"merge --out {out_dir} already exists and is not an empty folder; name a new one")
    model = load_without_adapter(model_dir)
    attach_adapter(model, model_dir)
    merge_lora(model)
    processor = SpatialMLLMProcessor.from_pretrained(model_dir)

    def build(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if (model_dir / RUN_INFO_FILE).is_file():
            shutil.copy2(model_dir / RUN_INFO_FILE, staging / RUN_INFO_FILE)

    # Assembled beside the target and renamed into place (fsynced first), so it appears whole or not at all.
    return write_folder(out_dir, build)


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "attach_adapter",
    "has_lora",
    "inject_lora",
    "linear_layer_names",
    "load_without_adapter",
    "merge_lora",
    "merge_lora_folder",
    "save_adapter",
    "split_lora_state_dict",
    "target_pattern",
]
