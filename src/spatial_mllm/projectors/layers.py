"""Small building blocks shared by projectors: LayerNorm2d, activations by name, init helpers, layer choices and
the base of the projectors that aggregate several ViT layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Projector, VisionGeometry

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, i.e. a channels-last LayerNorm applied at every pixel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def multi_level_layers(num_layers: int) -> tuple[int, ...]:
    """Hidden-state indices (0 = embeddings) of a mid/late layer mix: (L/2, 2L/3, L-2, L-1) -> (12, 16, 22, 23) at L=24.

    Duplicates, which appear for shallow test ViTs (L=6 -> 3, 4, 4, 5), are dropped keeping the order.
    """
    layers = (num_layers // 2, 2 * num_layers // 3, num_layers - 2, num_layers - 1)
    return tuple(dict.fromkeys(max(0, i) for i in layers))


def half_grid(grid: int) -> int:
    """Side of a 2x-downsampled grid, rounding up so odd grids keep their last row/column (27 -> 14)."""
    return (grid + 1) // 2


class MultiLayerProjector(Projector):
    """Base of the projectors that aggregate several ViT layers into a 2x-downsampled grid (SAEP, TokenPacker).

    `layers` (default multi_level_layers) are the aggregated hidden-state indices; `own_layer`, when given, is one
    more layer read on its own (LLaVA's hidden_states[-2], as a shortcut or as queries), read once even when it is
    also aggregated. `forward` gets the features of `layers` first, then that of `own_layer` if it was not among them.
    """

    def __init__(
        self, vision: VisionGeometry, llm_width: int, *, name: str, layers: Sequence[int] | None, own_layer: int | None
    ):
        super().__init__(vision, llm_width)
        self.layers = tuple(layers) if layers is not None else multi_level_layers(vision.num_layers)
        if not self.layers or not all(0 <= i <= vision.num_layers for i in self.layers):
            raise ValueError(f"{name} layers {self.layers} must lie in 0..{vision.num_layers} (0 = embeddings)")
        self.own_layer = own_layer
        extra = () if own_layer is None or own_layer in self.layers else (own_layer,)
        self._feature_layers = self.layers + extra

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self._feature_layers

    @property
    def num_tokens(self) -> int:
        return half_grid(self.vision.grid) ** 2

    def own_feature(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The (B, g*g, C) feature of `own_layer` among the features `forward` receives."""
        return features[self._feature_layers.index(self.own_layer)]


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with Normal(0, std) truncated to +-2 std, redrawing the draws that fall outside.

    Same distribution as torch.nn.init.trunc_normal_, whose inverse-CDF sampling is ~30x slower: it took over a
    minute for LLaVA-SP's 900M convolution weights on a 2-core CPU.
    """
    tensor.normal_(0.0, std)
    if tensor.device.type == "meta":
        return tensor
    flat = tensor.view(-1)
    outside = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while outside.numel():
        flat[outside] = torch.randn(outside.numel(), dtype=flat.dtype, device=flat.device) * std
        outside = outside[flat[outside].abs() > 2 * std]
    return tensor


def init_weights(module: nn.Module, linear_std: float = 0.02) -> None:
    """Explicit init of every Linear, Conv2d and LayerNorm inside `module`.

    Linear: trunc_normal(std=linear_std), zero bias. Conv2d: trunc_normal with std = 1/sqrt(fan_in) so a conv keeps
    the magnitude of its input (these convs sum up to 1024*24*24 inputs into one output). LayerNorm: ones/zeros.
    """
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            std = linear_std if isinstance(m, nn.Linear) else 1.0 / math.sqrt(m.weight[0].numel())
            trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
