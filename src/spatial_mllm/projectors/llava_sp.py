"""LLaVA-SP: six spatial tokens (SFE [-> DFI] -> Ws) placed before the LLaVA-1.5 patch tokens (Wp).

Official formulation at a 24x24 grid (github CnFaker/LLaVA-SP), generalised to any g x g grid:
- SFE sizes are round(g*i/6), i = 1..6 (halves round up, at least 1): 24 -> 4, 8, 12, 16, 20, 24; 12 -> 2, ..., 12.
  Pooling: AdaptiveAvgPool2d(size) of the grid; Cropping: the centred size x size crop (start (g - size) // 2).
  Each region goes through a Conv2d whose kernel is the region size, i.e. one linear map to one token.
- DFI detail conv keeps a 5x5 output: stride = round(g/12) (at least 1), kernel = g - 4*stride, so the 5 positions
  per side tile the whole grid: 24 -> kernel 16 stride 2 (official), 12 -> 8/1, 16 -> 12/1, 27 -> 19/2.
Unlike the official code, every parameter is initialised and the variant is an option, not a string literal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Projector, VisionGeometry, from_grid, register_projector, to_grid
from .layers import init_weights
from .mlp import mlp2x_gelu

SFE_MODES = ("pooling", "cropping")
NUM_SPATIAL_TOKENS = 6
DETAIL_GRID = 5
# The official key names carry the SFE sizes of the 24x24 grid, whatever grid we are built for.
OFFICIAL_SFE_SIZES = (4, 8, 12, 16, 20, 24)


def sfe_sizes(grid: int) -> tuple[int, ...]:
    """round(grid * i / 6) for i = 1..6, halves rounded up, at least 1."""
    return tuple(max(1, (2 * grid * i + 6) // 12) for i in range(1, NUM_SPATIAL_TOKENS + 1))


def detail_conv_geometry(grid: int) -> tuple[int, int]:
    """(kernel, stride) of the DFI detail conv so that it yields exactly DETAIL_GRID x DETAIL_GRID tokens."""
    stride = max(1, (grid + 6) // 12)
    kernel = grid - (DETAIL_GRID - 1) * stride
    if kernel < 1:
        raise ValueError(
            f"LLaVA-SP DFI needs a grid of at least {DETAIL_GRID}x{DETAIL_GRID} patches, got {grid}x{grid}"
        )
    return kernel, stride


class SpatialFeatureExtractor(nn.Module):
    """Six regions of the grid, each collapsed by a full-size conv into one token: (B, C, g, g) -> (B, 6, out_width)."""

    def __init__(self, width: int, grid: int, out_width: int, mode: str):
        super().__init__()
        if mode not in SFE_MODES:
            raise ValueError(f"LLaVA-SP sfe must be one of {SFE_MODES}, got {mode!r}")
        self.mode = mode
        self.grid = grid
        self.sizes = sfe_sizes(grid)
        self.convs = nn.ModuleList(nn.Conv2d(width, out_width, kernel_size=s, bias=False) for s in self.sizes)

    def region(self, fmap: torch.Tensor, size: int) -> torch.Tensor:
        if size == self.grid:
            return fmap
        if self.mode == "pooling":
            return F.adaptive_avg_pool2d(fmap, size)
        start = (self.grid - size) // 2
        return fmap[:, :, start : start + size, start : start + size]

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        # A conv whose kernel covers its whole input is one linear map of the flattened input; F.linear computes it
        # 5-10x faster than a CPU conv. The weights keep the official Conv2d shape (out, C, size, size).
        # Smallest region first, as in the official code (pooling: most abstract first; cropping: centre first).
        tokens = [
            F.linear(self.region(fmap, size).flatten(1), conv.weight.flatten(1))
            for size, conv in zip(self.sizes, self.convs)
        ]
        return torch.stack(tokens, dim=1)


def norm_linear(width: int) -> nn.Sequential:
    # Index layout 0/1 matches the official `{query,key,value}_projector.{0,1}` keys.
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))


class DetailFeatureIntegrator(nn.Module):
    """Single-head cross-attention of the spatial tokens over 5x5 detail tokens; returns concat([c, attended]).

    No output projection and no residual, as in the official code: (B, 6, d) -> (B, 6, 2d).
    """

    def __init__(self, width: int, grid: int, dim: int):
        super().__init__()
        kernel, stride = detail_conv_geometry(grid)
        self.detail_conv = nn.Conv2d(width, dim, kernel_size=kernel, stride=stride, bias=False)
        self.query = norm_linear(dim)
        self.key = norm_linear(dim)
        self.value = norm_linear(dim)

    def forward(self, spatial: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        detail = from_grid(self.detail_conv(fmap))
        # Default SDPA scale is 1/sqrt(dim), the official scaling.
        attended = F.scaled_dot_product_attention(self.query(spatial), self.key(detail), self.value(detail))
        return torch.cat([spatial, attended], dim=-1)


# The variants: Pooling SFE + DFI (most likely what the paper evaluated, "adaptive-pooling-fuse-25"); Cropping SFE
# + DFI (the official Ws has a bias in this variant); Pooling without DFI (the official code's default branch).
@register_projector("llava_sp_pooling", sfe="pooling", dfi=True, ws_bias=False)
@register_projector("llava_sp_cropping", sfe="cropping", dfi=True, ws_bias=True)
@register_projector("llava_sp_pooling_nodfi", sfe="pooling", dfi=False, ws_bias=False)
class LlavaSP(Projector):
    """LLaVA-SP projector; output = concat([Ws(spatial tokens) (6), Wp(patch tokens) (g*g)]), spatial first.

    sfe: "pooling" or "cropping"; dfi: fuse 5x5 detail tokens into the spatial tokens; ws_bias: bias of the Ws Linear
    (official: False for pooling, True for cropping); spatial_width: width of an SFE token (official 512).
    """

    def __init__(
        self, vision: VisionGeometry, llm_width: int, *, sfe: str, dfi: bool, ws_bias: bool, spatial_width: int = 512
    ):
        super().__init__(vision, llm_width)
        self.patch_projector = mlp2x_gelu(vision.width, llm_width)
        self.sfe = SpatialFeatureExtractor(vision.width, vision.grid, spatial_width, sfe)
        self.dfi = DetailFeatureIntegrator(vision.width, vision.grid, spatial_width) if dfi else None
        ws_in = 2 * spatial_width if dfi else spatial_width
        # Index layout 0/1 matches the official `conv_linear.{1}` keys (GELU first).
        self.spatial_projector = nn.Sequential(nn.GELU(), nn.Linear(ws_in, llm_width, bias=ws_bias))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return NUM_SPATIAL_TOKENS + self.vision.grid**2

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.check_features(features)
        patches = features[0]
        fmap = to_grid(patches, self.vision.grid)
        spatial = self.sfe(fmap)
        if self.dfi is not None:
            spatial = self.dfi(spatial, fmap)
        return torch.cat([self.spatial_projector(spatial), self.patch_projector(patches)], dim=1)

    def official_key_map(self) -> dict[str, str]:
        """Official LLaVA-SP key (without the `base_model.model.` prefix) -> our state_dict key, one per parameter.

        Names follow the official 24x24 code; at another grid or width the names still map but the shapes differ,
        so a loader must compare shapes too.
        """
        keys: dict[str, str] = {}
        for i, official_size in enumerate(OFFICIAL_SFE_SIZES):
            # Pooling wraps each conv but the full-grid one in Sequential(pool, conv).
            wrapped = self.sfe.mode == "pooling" and i < NUM_SPATIAL_TOKENS - 1
            keys[f"model.conv_{official_size}{'.1' if wrapped else ''}.weight"] = f"sfe.convs.{i}.weight"
        ws_params = ("weight", "bias") if self.spatial_projector[1].bias is not None else ("weight",)
        for name in ws_params:
            keys[f"model.conv_linear.1.{name}"] = f"spatial_projector.1.{name}"
        if self.dfi is not None:
            keys["model.conv_CM.weight"] = "dfi.detail_conv.weight"
            for role in ("query", "key", "value"):
                for index in (0, 1):
                    for name in ("weight", "bias"):
                        keys[f"model.{role}_projector.{index}.{name}"] = f"dfi.{role}.{index}.{name}"
        for index in (0, 2):
            for name in ("weight", "bias"):
                keys[f"model.mm_projector.{index}.{name}"] = f"patch_projector.{index}.{name}"
        return keys
