"""SpatialMLLMProcessor: LLaVA `pad` + the ViT's own image processor, and `<image>` expanded to the projector's tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .configuration import IMAGE_TOKEN


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `image_aspect_ratio=pad`: centre the image on a square canvas of the processor's mean colour."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class SpatialMLLMProcessor(ProcessorMixin):
    """`processor(images=..., text=...)` -> input_ids (each `<image>` expanded), attention_mask, pixel_values."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
        pad_images: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ):
        if num_image_tokens is None or num_image_tokens <= 0:
            raise ValueError("num_image_tokens must be the projector's token count (model.num_image_tokens)")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.pad_images = pad_images
        if tokenizer is not None and image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {image_token!r} token: add it with add_special_tokens first")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def mean_colour(self) -> tuple[int, int, int]:
        return tuple(int(round(255 * m)) for m in self.image_processor.image_mean)

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.pad_images:
            images = [pad_to_square(image, self.mean_colour()) for image in images]
        else:
            images = [image.convert("RGB") for image in images]
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def expand_image_tokens(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = True,
        add_special_tokens: bool = True,
        return_tensors: str = "pt",
        **tokenizer_kwargs,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("text is required; put one <image> in it for each image")
        texts = [text] if isinstance(text, str) else list(text)
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images or [])
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(f"the text has {n_placeholders} {self.image_token} placeholder(s) for {len(images)} image(s)")
        encoded = self.tokenizer(
            [self.expand_image_tokens(t) for t in texts],
            padding=padding,
            add_special_tokens=add_special_tokens,
            return_tensors=return_tensors,
            **tokenizer_kwargs,
        )
        data = dict(encoded)
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["SpatialMLLMProcessor", "pad_to_square"]
