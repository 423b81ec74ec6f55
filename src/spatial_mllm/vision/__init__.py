"""Vision towers: the frozen ViT that hands each projector the hidden states it reads."""

from .tower import VISION_BACKBONES, VisionTower

__all__ = ["VISION_BACKBONES", "VisionTower"]
