"""A LLaVA dataset whose images are served as cached frozen-ViT features instead of pixels."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..data.dataset import LlavaDataset
from .feature_cache import VisionFeatures


class CachedFeatureDataset(Dataset):
    """Wraps a LlavaDataset built with load_images=False; each item gets `vision_features` for its images.

    Valid only while the vision tower stays frozen: the cache fingerprint ties it to the tower's weights.
    """

    def __init__(self, base: LlavaDataset, features: VisionFeatures, layers: tuple[int, ...]):
        if base.load_images:
            raise ValueError("build the LlavaDataset with load_images=False: images come from the feature cache")
        self.base = base
        self.features = features
        self.layers = layers

    def __len__(self) -> int:
        return len(self.base)

    @property
    def lengths(self) -> list[int]:
        return self.base.lengths

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        if item["images"]:
            item["vision_features"] = self.features.lookup(list(item["images"]), self.layers)
        return item
