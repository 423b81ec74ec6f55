"""TokenPacker: each query of a 2x-downsampled grid attends over its 2x2 window of multi-layer keys, then mlp2x_gelu."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import VisionGeometry, from_grid, register_projector, to_grid
from .layers import MultiLayerProjector, half_grid, init_weights, trunc_normal_
from .mlp import mlp2x_gelu


def kv_projection(in_width: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_width, width), nn.GELU(), nn.Linear(width, width))


def windows_2x2(x: torch.Tensor, out_grid: int) -> torch.Tensor:
    """(B, 2n, 2n, C) channels-last map -> (B * n * n, 4, C): the 2x2 window of each output cell, row-major."""
    b, _, _, c = x.shape
    x = x.reshape(b, out_grid, 2, out_grid, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * out_grid * out_grid, 4, c)


@register_projector("tokenpacker")
class TokenPacker(MultiLayerProjector):
    """(B, g*g, C) x k layers -> (B, ceil(g/2)^2, D).

    Queries: bilinear downsample of hidden_states[-2]; keys/values: the concat of `layers` (default L/2, 2L/3, L-2,
    L-1), each through Linear-GELU-Linear and LayerNorm. Odd grids are zero-padded and the padded keys masked.
    """

    def __init__(
        self, vision: VisionGeometry, llm_width: int, *, layers: Sequence[int] | None = None, num_heads: int = 8
    ):
        # The queries come from LLaVA's feature, hidden_states[-2].
        super().__init__(vision, llm_width, name="tokenpacker", layers=layers, own_layer=vision.num_layers - 1)
        if vision.width % num_heads:
            raise ValueError(f"tokenpacker num_heads={num_heads} must divide the ViT width {vision.width}")

        width = vision.width
        self.query_proj = nn.Linear(width, width, bias=False)
        self.query_norm = nn.LayerNorm(width, eps=1e-6)
        self.key_proj = kv_projection(width * len(self.layers), width)
        self.key_norm = nn.LayerNorm(width, eps=1e-6)
        self.value_proj = kv_projection(width * len(self.layers), width)
        self.value_norm = nn.LayerNorm(width, eps=1e-6)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp = mlp2x_gelu(width, llm_width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        trunc_normal_(self.attention.in_proj_weight, 0.02)
        nn.init.zeros_(self.attention.in_proj_bias)

    def windows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, g*g, C) -> (B * n * n, 4, C) 2x2 windows; odd grids are zero-padded at the bottom/right first."""
        grid, out_grid = self.vision.grid, half_grid(self.vision.grid)
        pad = 2 * out_grid - grid
        fmap = tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[-1])
        return windows_2x2(F.pad(fmap, (0, 0, 0, pad, 0, pad)), out_grid)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        grid, out_grid = self.vision.grid, half_grid(self.vision.grid)
        batch, width = features[0].shape[0], self.vision.width

        query_source = to_grid(self.own_feature(features), grid)
        query = from_grid(F.interpolate(query_source, size=(out_grid, out_grid), mode="bilinear"))
        query = self.query_norm(self.query_proj(query)).reshape(batch * out_grid * out_grid, 1, width)

        multi_level = torch.cat(features[: len(self.layers)], dim=-1)
        keys = self.windows(self.key_norm(self.key_proj(multi_level)))
        values = self.windows(self.value_norm(self.value_proj(multi_level)))
        padding_mask = None
        if 2 * out_grid != grid:
            valid = torch.ones(1, grid * grid, 1, dtype=torch.bool, device=keys.device)
            padding_mask = ~self.windows(valid)[..., 0].repeat(batch, 1)
        packed, _ = self.attention(query, keys, values, key_padding_mask=padding_mask, need_weights=False)
        return self.mlp(packed.reshape(batch, out_grid * out_grid, width))
