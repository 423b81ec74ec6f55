from .tower import VISION_BACKBONES, VisionTower

__all__ = ["VISION_BACKBONES", "VisionTower"]
