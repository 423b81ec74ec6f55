"""What every projector shares: how it is built, which ViT layers it reads, how many tokens it emits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class ProjectorEntry:
    """A registered projector: its class and the default options that make this variant."""

    cls: type["Projector"]
    defaults: Mapping[str, Any] = field(default_factory=dict)


PROJECTORS: Registry[ProjectorEntry] = Registry("projector")


def register_projector(name: str, **defaults: Any) -> Callable[[type["Projector"]], type["Projector"]]:
    """Class decorator registering `name` -> the class built with these default options (a user's options win);
    stack it for several variants of one class (LLaVA-SP Pooling / Cropping, linear / mlp2x_gelu)."""

    def add(cls: type[Projector]) -> type[Projector]:
        PROJECTORS.register(name)(ProjectorEntry(cls, dict(defaults)))
        return cls

    return add


@dataclass(frozen=True)
class VisionGeometry:
    """What a projector needs to know of the vision tower.

    width: hidden size of the ViT; grid: patches per side (24 for ViT-L/14-336);
    num_layers: transformer blocks (hidden_states holds num_layers + 1 entries, index 0 = embeddings).
    """

    width: int
    grid: int
    num_layers: int


class Projector(nn.Module):
    """Maps ViT patch features to LLM input embeddings.

    Subclasses are built from (vision geometry, LLM width, their own keyword options), declare the hidden-state
    indices they read in `feature_layers` (indices into HF `hidden_states`, 0 = embedding output), and report
    `num_tokens` for the grid they were built for. `forward` receives one (B, grid*grid, width) tensor per feature
    layer (CLS already dropped, row-major patches) in the order of `feature_layers` and returns (B, num_tokens, llm_width).
    """

    def __init__(self, vision: VisionGeometry, llm_width: int):
        super().__init__()
        self.vision = vision
        self.llm_width = llm_width

    @property
    def feature_layers(self) -> tuple[int, ...]:
        # LLaVA's choice: the output of the penultimate block.
        return (self.vision.num_layers - 1,)

    @property
    def num_tokens(self) -> int:
        raise NotImplementedError

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise every parameter explicitly (the official LLaVA-SP left its convolutions uninitialised)."""
        raise NotImplementedError

    def official_key_map(self) -> dict[str, str]:
        """Official checkpoint key (LLaVA / LLaVA-SP naming, without `base_model.model.`) -> our state-dict key.

        Projectors with a released upstream format override this; the loader in `spatial_mllm.weights` uses it
        for a strict, refusing load.
        """
        raise NotImplementedError(f"{type(self).__name__} has no official upstream checkpoint format")

    def check_features(self, features: list[torch.Tensor]) -> None:
        expected = self.vision.grid * self.vision.grid
        if len(features) != len(self.feature_layers):
            raise ValueError(
                f"{type(self).__name__} reads {len(self.feature_layers)} ViT layers {self.feature_layers}, got {len(features)}"
            )
        for f in features:
            if f.ndim != 3 or f.shape[1] != expected or f.shape[2] != self.vision.width:
                raise ValueError(
                    f"{type(self).__name__} built for a {self.vision.grid}x{self.vision.grid} grid of width "
                    f"{self.vision.width} expects (B, {expected}, {self.vision.width}) features, got {tuple(f.shape)}"
                )


def to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid*grid, C) row-major tokens -> (B, C, grid, grid) feature map."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid, grid)


def from_grid(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) row-major tokens."""
    return fmap.flatten(2).transpose(1, 2)


def build_projector(name: str, vision: VisionGeometry, llm_width: int, **options) -> Projector:
    entry = PROJECTORS.get(name)
    try:
        projector = entry.cls(vision, llm_width, **{**entry.defaults, **options})
    except TypeError as err:
        raise TypeError(f"projector {name!r}: bad options {options}: {err}") from None
    # Several registered names share a class (LLaVA-SP variants): remember which one this is.
    projector.projector_type = name
    return projector
