"""The frozen ViT: a transformers vision model that hands each projector the hidden states it asks for.

Towers are built by transformers' Auto classes from their config; what is ours is per family only what the Auto
classes do not say: whether the hidden states start with a CLS token, and which image processor a bare config
(no folder) gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

from ..projectors.base import VisionGeometry
from ..registry import Registry


@dataclass(frozen=True)
class VisionBackbone:
    """What transformers does not tell about one family of vision towers (keyed by the vision config's model_type)."""

    has_cls_token: bool
    image_processor_class: str  # for a tower built from a bare config; a folder's own processor is used otherwise


VISION_BACKBONES: Registry[VisionBackbone] = Registry("vision backbone")
VISION_BACKBONES.register("clip_vision_model")(VisionBackbone(True, "CLIPImageProcessorPil"))
VISION_BACKBONES.register("siglip_vision_model")(VisionBackbone(False, "SiglipImageProcessorPil"))


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """Accepts a vision config or a full CLIP/SigLIP config (as stored in hub folders) and returns the vision part."""
    if config.model_type in VISION_BACKBONES:
        return config
    inner = getattr(config, "vision_config", None)
    if inner is not None and inner.model_type in VISION_BACKBONES:
        return inner
    raise ValueError(
        f"vision model type {config.model_type!r} is not supported; registered: {', '.join(VISION_BACKBONES.names())}"
    )


def backbone_of(config: PreTrainedConfig) -> VisionBackbone:
    return VISION_BACKBONES.get(config.model_type)


class VisionTower(nn.Module):
    """Wraps a transformers vision model; frozen by default.

    `forward(pixel_values, layers)` returns one (B, grid*grid, width) tensor per requested hidden-state index,
    patch tokens only (CLS dropped where the model has one).
    """

    def __init__(self, model: PreTrainedModel, frozen: bool = True):
        super().__init__()
        self.model = model
        self.backbone = backbone_of(model.config)
        if frozen:
            self.freeze()

    @classmethod
    def from_config(cls, config: PreTrainedConfig, frozen: bool = True) -> "VisionTower":
        return cls(AutoModel.from_config(vision_config_of(config)), frozen=frozen)

    @classmethod
    def from_pretrained(cls, name_or_path: str, frozen: bool = True, **kwargs) -> "VisionTower":
        """Loads a vision tower from a hub name or a local folder (a full CLIP/SigLIP checkpoint or a vision-only one)."""
        import transformers

        config = vision_config_of(AutoConfig.from_pretrained(name_or_path, **kwargs))
        # A full CLIP/SigLIP folder also holds the text tower: transformers would list each of its weights as
        # unexpected. Only the vision weights matter here, and missing ones still raise below.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, info = AutoModel.from_pretrained(name_or_path, config=config, output_loading_info=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            raise ValueError(f"{name_or_path}: vision weights missing: {sorted(info['missing_keys'])[:8]}")
        return cls(model, frozen=frozen)

    def freeze(self) -> None:
        self.model.requires_grad_(False)

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def geometry(self) -> VisionGeometry:
        cfg = self.model.config
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
        return VisionGeometry(
            width=cfg.hidden_size, grid=cfg.image_size // cfg.patch_size, num_layers=cfg.num_hidden_layers
        )

    def forward(self, pixel_values: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        num_states = self.geometry.num_layers + 1
        for layer in layers:
            if not -num_states <= layer < num_states:
                raise ValueError(f"ViT layer {layer} does not exist: the tower has {num_states} hidden states")
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        # SigLIP's hidden states stop before its pooling head, CLIP's include CLS at position 0.
        start = 1 if self.backbone.has_cls_token else 0
        return [outputs.hidden_states[layer][:, start:] for layer in layers]
