"""Images to pixel values, as LLaVA prepares them: the one image transform of the toolkit.

LLaVA-1.5's `image_aspect_ratio=pad` centres each image on a square canvas filled with the ViT's mean colour,
written `tuple(int(x * 255) for x in image_mean)` (truncated, not rounded: released checkpoints were trained so),
then hands it to the ViT's own image processor. The processor uses this transform, and so do feature caching and
encoder pretraining, which need pixels but no tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def mean_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's pad colour for a processor's mean."""
    return tuple(int(255 * m) for m in image_mean)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of colour `fill` (RGB); a square image comes back as it is."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageTransform:
    """PIL images -> (N, 3, H, W) pixel values through `image_processor`, padded to square first when `pad`.

    A plain class (not a closure), so DataLoader workers can pickle it.
    """

    def __init__(self, image_processor, pad: bool = True):
        self.image_processor = image_processor
        self.pad = pad

    @property
    def fill(self) -> tuple[int, int, int]:
        return mean_colour(self.image_processor.image_mean)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        images = [pad_to_square(image, self.fill) if self.pad else image.convert("RGB") for image in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def normalise_pixels(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images already square and at the processor's size -> what the processor gives for them
    (rescale, then its mean and std): for pretraining loops that render images in memory in batches."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


__all__ = ["ImageTransform", "mean_colour", "normalise_pixels", "pad_to_square"]
