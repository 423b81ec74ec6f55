"""A LoRA adapter saved beside a model, in peft's format: attaching it (strictly) and folding it into the LLM.

A LoRA run's folder holds the full model without LoRA (config.json + model.safetensors, with the trained
projector) and, beside it, adapter_config.json + adapter_model.safetensors. transformers itself loads such a folder
as base model + embedded adapter; the toolkit's loader (loading.py) attaches the adapter here instead, refusing any
weight that does not fit, and only when the run that wrote the folder listed the adapter as its own.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file
import torch
from torch import nn

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PEFT_PREFIX = "base_model.model."  # peft's files name keys from its PeftModel wrapper
LEGACY_LM_PREFIX, NEW_LM_PREFIX = "language_model.model.", "model.language_model."


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def attach_adapter(model: nn.Module, model_dir: Path) -> None:
    """Injects the folder's LoRA layers into `model` and loads their weights, refusing any mismatch."""
    try:
        config = LoraConfig.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"{model_dir / ADAPTER_CONFIG}: not a readable LoRA config ({err})") from None
    try:
        weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(model_dir / ADAPTER_WEIGHTS).items()}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{model_dir / ADAPTER_WEIGHTS}: not a readable safetensors file ({err}); was it copied completely?"
        ) from None
    if any(key.startswith(LEGACY_LM_PREFIX) for key in weights):
        # Saved before the model took transformers' Llava layout: the LLM's decoder moved to model.language_model.
        weights = {NEW_LM_PREFIX + key.removeprefix(LEGACY_LM_PREFIX): v for key, v in weights.items()}
        if isinstance(config.target_modules, str) and config.target_modules.startswith("language_model"):
            config.target_modules = r"model\." + config.target_modules
    attach_adapter_weights(model, config, weights, str(model_dir / ADAPTER_WEIGHTS))


def attach_adapter_weights(model: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    """Injects LoRA layers where `config` says and loads `weights` (peft's on-disk names without the PeftModel
    prefix), refusing any tensor left over and any LoRA layer left without weights; `source` names them in errors."""
    inject_adapter_in_model(config, model, ADAPTER_NAME)
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{source} does not fit the model: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}")


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


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_NAME",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "attach_adapter",
    "attach_adapter_weights",
    "has_lora",
    "merge_lora",
]
