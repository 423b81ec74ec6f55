"""SAEP: multi-layer ViT features -> modified separable depthwise conv (2x down, 75% fewer tokens) -> MLP readout.

The paper states only "a modified separable depthwise convolution module" on "multi-layer visual features" that
cuts visual tokens by 75%. The construction below is our reading of it, with every choice an option:
    layers (default L/2, 2L/3, L-2, L-1) -> aggregate (concat on channels) -> depthwise 3x3 stride 2 -> LayerNorm2d
    -> activation -> pointwise 1x1 to the ViT width -> LayerNorm2d; "modified": + AvgPool2d(2) of hidden_states[-2]
    (the LLaVA feature) as a shortcut; readout Linear -> activation -> Linear.
Odd grids keep their last row/column (padding 1 / ceil-mode pooling): 27x27 -> 14x14 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import VisionGeometry, from_grid, register_projector, to_grid
from .layers import LayerNorm2d, MultiLayerProjector, init_weights, make_activation

AGGREGATIONS = ("concat", "mean", "weighted")
DOWNSAMPLINGS = ("stride2", "pool")


class SeparableDownsample(nn.Module):
    """Depthwise 3x3 (stride 2, or stride 1 then 2x2 avg pool) -> LayerNorm2d -> act -> pointwise 1x1 -> LayerNorm2d."""

    def __init__(self, in_channels: int, out_channels: int, downsampling: str, act: str):
        super().__init__()
        stride = 2 if downsampling == "stride2" else 1
        # No bias: a LayerNorm follows at once.
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if downsampling == "pool" else nn.Identity()
        self.depthwise_norm = LayerNorm2d(in_channels)
        self.act = make_activation(act)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)
        self.pointwise_norm = LayerNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.depthwise_norm(self.pool(self.depthwise(x))))
        return self.pointwise_norm(self.pointwise(x))


def mlp_readout(in_width: int, out_width: int, depth: int, act: str) -> nn.Sequential:
    """Linear(in, out) followed by depth-1 times (act, Linear(out, out)); depth 2 is LLaVA's mlp2x_gelu."""
    modules: list[nn.Module] = [nn.Linear(in_width, out_width)]
    for _ in range(depth - 1):
        modules += [make_activation(act), nn.Linear(out_width, out_width)]
    return nn.Sequential(*modules)


@register_projector("saep")
class SAEP(MultiLayerProjector):
    """Spatially aware efficient projector: (B, g*g, C) x k layers -> (B, ceil(g/2)^2, D).

    layers: hidden-state indices to aggregate (default L/2, 2L/3, L-2, L-1); aggregation: "concat" (channels),
    "mean", or "weighted" (learned softmax weights); downsampling: "stride2" depthwise or "pool" (stride 1 then
    2x2 average); shortcut: add the 2x2-pooled hidden_states[-2]; activation: gelu/silu/relu; readout_depth:
    Linear layers in the readout MLP.
    """

    def __init__(
        self,
        vision: VisionGeometry,
        llm_width: int,
        *,
        layers: Sequence[int] | None = None,
        aggregation: str = "concat",
        downsampling: str = "stride2",
        shortcut: bool = True,
        activation: str = "gelu",
        readout_depth: int = 2,
    ):
        # The default layers are distinct; only chosen ones can repeat.
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError(f"saep layers must be distinct hidden-state indices, got {tuple(layers)}")
        # The shortcut reads LLaVA's feature, hidden_states[-2].
        super().__init__(
            vision, llm_width, name="saep", layers=layers, own_layer=vision.num_layers - 1 if shortcut else None
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"saep aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if downsampling not in DOWNSAMPLINGS:
            raise ValueError(f"saep downsampling must be one of {DOWNSAMPLINGS}, got {downsampling!r}")
        if readout_depth < 1:
            raise ValueError(f"saep readout_depth must be at least 1, got {readout_depth}")
        self.aggregation = aggregation

        width = vision.width
        in_channels = width * len(self.layers) if aggregation == "concat" else width
        self.layer_logits = nn.Parameter(torch.empty(len(self.layers))) if aggregation == "weighted" else None
        self.downsample = SeparableDownsample(in_channels, width, downsampling, activation)
        self.shortcut = nn.AvgPool2d(2, ceil_mode=True) if shortcut else None
        self.readout = mlp_readout(width, llm_width, readout_depth, activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        if self.layer_logits is not None:
            nn.init.zeros_(self.layer_logits)  # start as the plain mean

    def aggregate(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.aggregation == "concat":
            return torch.cat(maps, dim=1)
        stacked = torch.stack(maps)
        if self.aggregation == "mean":
            return stacked.mean(0)
        weights = self.layer_logits.softmax(0).to(stacked.dtype)
        return torch.einsum("k,kbchw->bchw", weights, stacked)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        grid = self.vision.grid
        maps = [to_grid(f, grid) for f in features[: len(self.layers)]]
        x = self.downsample(self.aggregate(maps))
        if self.shortcut is not None:
            x = x + self.shortcut(to_grid(self.own_feature(features), grid))
        return self.readout(from_grid(x))
