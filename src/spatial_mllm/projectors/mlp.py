"""LLaVA's projectors: `linear` (LLaVA-1) and `mlp2x_gelu` (LLaVA-1.5, the baseline of every comparison)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Projector, VisionGeometry, register_projector


def mlp2x_gelu(in_width: int, out_width: int) -> nn.Sequential:
    # Index layout 0/1/2 matches LLaVA's `mm_projector.{0,2}` keys.
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_projector("linear", depth=1)
@register_projector("mlp2x_gelu", depth=2)
class MLPProjector(Projector):
    """One token per patch: a Linear (depth 1, LLaVA-1) or Linear-GELU-Linear (depth 2, LLaVA-1.5)."""

    def __init__(self, vision: VisionGeometry, llm_width: int, *, depth: int):
        super().__init__(vision, llm_width)
        if depth not in (1, 2):
            raise ValueError(f"MLP projector depth must be 1 (linear) or 2 (mlp2x_gelu), got {depth}")
        self.depth = depth
        self.mlp = mlp2x_gelu(vision.width, llm_width) if depth == 2 else nn.Sequential(nn.Linear(vision.width, llm_width))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.vision.grid**2

    def reset_parameters(self) -> None:
        init_linear(self)

    def official_key_map(self) -> dict[str, str]:
        if self.depth == 1:  # LLaVA-1's mm_projector is the Linear itself
            return {f"model.mm_projector.{name}": f"mlp.0.{name}" for name in ("weight", "bias")}
        return {f"model.mm_projector.{i}.{name}": f"mlp.{i}.{name}" for i in (0, 2) for name in ("weight", "bias")}

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        return self.mlp(features[0])
