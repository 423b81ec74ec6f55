"""LLaVA's projectors: `linear` (LLaVA-1) and `mlp2x_gelu` (LLaVA-1.5, the baseline of every comparison)."""

from __future__ import annotations

import torch
from torch import nn

from .base import PROJECTORS, Projector, VisionGeometry


def mlp2x_gelu(in_width: int, out_width: int) -> nn.Sequential:
    # Index layout 0/1/2 matches LLaVA's `mm_projector.{0,2}` keys.
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@PROJECTORS.register("linear")
class LinearProjector(Projector):
    def __init__(self, vision: VisionGeometry, llm_width: int):
        super().__init__(vision, llm_width)
        self.proj = nn.Linear(vision.width, llm_width)
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.vision.grid**2

    def reset_parameters(self) -> None:
        init_linear(self)

    def official_key_map(self) -> dict[str, str]:
        return {f"model.mm_projector.{name}": f"proj.{name}" for name in ("weight", "bias")}

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        return self.proj(features[0])


@PROJECTORS.register("mlp2x_gelu")
class MLPProjector(Projector):
    def __init__(self, vision: VisionGeometry, llm_width: int):
        super().__init__(vision, llm_width)
        self.mlp = mlp2x_gelu(vision.width, llm_width)
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.vision.grid**2

    def reset_parameters(self) -> None:
        init_linear(self)

    def official_key_map(self) -> dict[str, str]:
        return {f"model.mm_projector.{i}.{name}": f"mlp.{i}.{name}" for i in (0, 2) for name in ("weight", "bias")}

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        return self.mlp(features[0])
