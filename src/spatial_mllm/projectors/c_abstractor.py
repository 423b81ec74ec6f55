"""C-Abstractor (Honeybee): position embedding -> 3 RegNet bottlenecks -> 2x adaptive pool -> 3 more -> MLP readout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Projector, VisionGeometry, from_grid, register_projector, to_grid
from .layers import LayerNorm2d, half_grid, init_weights, trunc_normal_


class SqueezeExcite(nn.Module):
    """Channel gate from the global average: x * sigmoid(W2 act(W1 mean(x)))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.act = nn.SiLU()
        self.expand = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.act(self.reduce(x.mean((2, 3)))))
        return x * gate.sigmoid()[:, :, None, None]


class RegNetBottleneck(nn.Module):
    """timm's RegNet bottleneck as Honeybee configures it (bottle ratio 1, depthwise, SE 1/4, LayerNorm2d, SiLU)."""

    def __init__(self, width: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.norm1 = LayerNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.norm2 = LayerNorm2d(width)
        self.se = SqueezeExcite(width, round(width * se_ratio))
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.norm3 = LayerNorm2d(width)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.se(self.act(self.norm2(self.conv2(y))))
        y = self.norm3(self.conv3(y))
        return self.act(y + x)


@register_projector("c_abstractor")
class CAbstractor(Projector):
    """(B, g*g, C) from the last ViT block -> (B, ceil(g/2)^2, D). depth: bottlenecks before and after the pool."""

    def __init__(self, vision: VisionGeometry, llm_width: int, *, depth: int = 3):
        super().__init__(vision, llm_width)
        width = vision.width
        self.pos_embed = nn.Parameter(torch.empty(1, vision.grid**2, width))
        self.stage1 = nn.Sequential(*(RegNetBottleneck(width) for _ in range(depth)))
        self.stage2 = nn.Sequential(*(RegNetBottleneck(width) for _ in range(depth)))
        self.readout = nn.Sequential(nn.Linear(width, llm_width), nn.SiLU(), nn.Linear(llm_width, llm_width))
        self.reset_parameters()

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return (self.vision.num_layers,)

    @property
    def num_tokens(self) -> int:
        return half_grid(self.vision.grid) ** 2

    def reset_parameters(self) -> None:
        init_weights(self)
        trunc_normal_(self.pos_embed, 0.02)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        x = to_grid(features[0] + self.pos_embed, self.vision.grid)
        x = self.stage1(x)
        x = F.adaptive_avg_pool2d(x, half_grid(self.vision.grid))
        x = self.stage2(x)
        return self.readout(from_grid(x))
