"""Which parameters train in each stage, and the optimiser's parameter groups.

align:    the whole projector (for LLaVA-SP: Wp, SFE, DFI and Ws; the official release left DFI frozen by mistake).
instruct: the whole projector, plus the LLM through LoRA (adapter weights only) or fully.
The vision tower is frozen unless `vision.trainable`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

PROJECTOR_PREFIX = "model.projector."
VISION_PREFIX = "model.vision_tower."
LORA_MARKER = ".lora_"  # peft names adapter weights `<layer>.lora_A.<adapter>.weight`, `<layer>.lora_B...`


def configure_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Sets requires_grad on every parameter for the configured stage (after LoRA was injected, if enabled)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, config))


def is_trainable(name: str, config: TrainConfig) -> bool:
    if name.startswith(PROJECTOR_PREFIX):
        return True
    if name.startswith(VISION_PREFIX):
        return config.vision.trainable
    if config.stage.name == "align":
        return False
    return LORA_MARKER in name if config.lora.enabled else True


def upcast_trainable(model: nn.Module) -> None:
    """Trainable weights are kept in float32 (frozen ones stay in model.dtype): small updates are not lost to rounding."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def component_of(name: str) -> str:
    if name.startswith(PROJECTOR_PREFIX):
        return "projector"
    if name.startswith(VISION_PREFIX):
        return "vision_tower"
    return "language_model"


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups by component (projector at projector_lr, the rest at lr) and by decay: biases and norms
    (1-D tensors) get no weight decay. Empty groups are left out; each group carries its `name` for logging."""
    opt = config.optimisation
    lrs = {"projector": opt.projector_lr or opt.lr, "language_model": opt.lr, "vision_tower": opt.lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((component_of(name), param.ndim >= 2), []).append(param)
    return [
        {
            "name": f"{component}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": lrs[component],
            "weight_decay": opt.weight_decay if decay else 0.0,
        }
        for (component, decay), params in sorted(groups.items())
    ]


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


__all__ = [
    "component_of",
    "configure_trainable",
    "is_trainable",
    "parameter_groups",
    "trainable_names",
    "upcast_trainable",
]
