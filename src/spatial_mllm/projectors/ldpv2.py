"""LDPv2 (MobileVLM V2): mlp2x_gelu per patch -> 2x average pool -> residual depthwise 3x3 conv (position encoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Projector, VisionGeometry, from_grid, register_projector, to_grid
from .layers import half_grid, init_weights
from .mlp import mlp2x_gelu


@register_projector("ldpv2")
class LDPv2(Projector):
    """(B, g*g, C) -> (B, ceil(g/2)^2, D); the pooling and the conv run at the LLM width."""

    def __init__(self, vision: VisionGeometry, llm_width: int):
        super().__init__(vision, llm_width)
        self.mlp = mlp2x_gelu(vision.width, llm_width)
        # PEG: a positional encoding generator, added back as x + peg(x).
        self.peg = nn.Conv2d(llm_width, llm_width, 3, padding=1, groups=llm_width)
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return half_grid(self.vision.grid) ** 2

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        x = to_grid(self.mlp(features[0]), self.vision.grid)
        x = F.adaptive_avg_pool2d(x, half_grid(self.vision.grid))
        return from_grid(x + self.peg(x))
