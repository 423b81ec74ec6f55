"""How much a model's answers depend on the image: the loss of the supervised tokens with each sample's own image,
and with the image of another sample in its place.

A model that ignores the image (answering from the question and the answer prior alone) scores the same loss both
ways; the gap, in nats per supervised token, measures how much it reads the image. It moves long before accuracy
leaves the answer prior, so it still tells projectors apart after a short training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..model.conversation import IGNORE_INDEX
from ..training.batches import move_batch

IMAGE_KEYS = ("pixel_values", "vision_features")


@dataclass(frozen=True)
class ImageReliance:
    loss_own_images: float  # mean loss per supervised token with each sample's own image(s)
    loss_other_images: float  # the same samples, each with the image(s) of another sample
    gap_standard_error: float  # of the gap, from the spread of the per-sample gaps (paired: same texts)
    supervised_tokens: int
    samples: int

    @property
    def gap(self) -> float:
        return self.loss_other_images - self.loss_own_images

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self) | {"gap": self.gap}


def _has_image(item: dict[str, Any]) -> bool:
    return any(item.get(key) is not None for key in IMAGE_KEYS)


def _image_count(item: dict[str, Any]) -> int:
    if item.get("pixel_values") is not None:
        return len(item["pixel_values"])
    return len(item["vision_features"][0])


class OtherImages(Dataset):
    """The image-bearing samples of `dataset`, each given the image(s) of the sample `shift` places further on
    (cyclically), or of the next one after it that shows other image files: no sample keeps its own picture, even
    where several samples ask about the same image."""

    def __init__(self, dataset: Dataset, shift: int = 1):
        self.items, seen = [], set()
        for item in (dataset[i] for i in range(len(dataset))):
            # A dataset that skips a broken record serves the next one in its place: count each sample once
            # (records may share an id, as a world's captions and conversations of one image do, so compare tokens).
            key = (item.get("id"), tuple(item["input_ids"].tolist()))
            if _has_image(item) and key not in seen:
                self.items.append(item)
                seen.add(key)
        if len(self.items) < 2:
            raise ValueError(f"swapping images needs at least 2 samples with images, found {len(self.items)}")
        if shift % len(self.items) == 0:
            raise ValueError(f"shift {shift} is a multiple of the {len(self.items)} image samples: nothing would move")
        self.donors = [self._donor(i, shift) for i in range(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def own(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def _donor(self, i: int, shift: int) -> int:
        images = self.items[i].get("images")
        for step in range(len(self.items)):
            j = (i + shift + step) % len(self.items)
            if j != i and (images is None or self.items[j].get("images") != images):
                return j
        raise ValueError(f"every sample with images shows the same image(s) as sample {self.items[i].get('id')!r}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        item, donor = self.items[i], self.items[self.donors[i]]
        if _image_count(item) != _image_count(donor):
            raise ValueError(
                f"sample {item.get('id')!r} has {_image_count(item)} image(s) but sample {donor.get('id')!r}, whose "
                f"images it would take, has {_image_count(donor)}; image reliance needs one count per sample"
            )
        return {**item, **{key: donor.get(key) for key in IMAGE_KEYS}}


@torch.inference_mode()
def supervised_losses(
    model: torch.nn.Module,
    samples: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (summed next-token cross-entropy over its supervised tokens, their number)."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(samples), batch_size):
        batch = move_batch(collate(samples[start : start + batch_size]), device)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", *IMAGE_KEYS) if batch.get(key) is not None}
        logits = model(**inputs).logits.float()
        targets = batch["labels"][:, 1:]  # image positions are already IGNORE_INDEX
        losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums.append(losses.sum(dim=1).double().cpu())
        counts.append((targets != IGNORE_INDEX).sum(dim=1).cpu())
    return torch.cat(sums), torch.cat(counts)


def image_reliance(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    batch_size: int = 32,
    shift: int = 1,
) -> ImageReliance:
    """Loss per supervised token of the image-bearing samples of `dataset` (items as LlavaDataset or
    CachedFeatureDataset yield them) with their own images and with another sample's."""
    swapped = OtherImages(dataset, shift)
    own, counts = supervised_losses(model, [swapped.own(i) for i in range(len(swapped))], collate, batch_size)
    other, _ = supervised_losses(model, [swapped[i] for i in range(len(swapped))], collate, batch_size)
    tokens = int(counts.sum())
    if tokens == 0:
        raise ValueError("the samples with images have no supervised tokens to score")
    # The gap is a ratio of sums; its standard error from the per-sample gaps, scaled to per-token units.
    per_sample_gap = other - own
    standard_error = float(per_sample_gap.std() * len(per_sample_gap) ** 0.5 / tokens)
    return ImageReliance(
        float(own.sum() / tokens), float(other.sum() / tokens), standard_error, tokens, len(swapped)
    )


__all__ = ["ImageReliance", "OtherImages", "image_reliance", "supervised_losses"]
