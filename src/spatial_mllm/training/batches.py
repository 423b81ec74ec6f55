"""How samples become this process's micro-batches: a deterministic order that can restart mid-epoch, and the
pass-through of cached vision features.

Each optimiser step consumes one global batch: `global_batch_size` consecutive indices of the epoch's order
(fixed by seed + epoch). It is cut into micro-batches; process r takes micro-batches r, r + W, r + 2W, ...
So one process with gradient accumulation and W processes see exactly the same micro-batches, and a resumed run
starts at any step without reading the skipped data. An incomplete last global batch is dropped.

With sample lengths given (LLaVA's `group_by_modality_length`, HF's length-grouped sampler), the epoch's
permutation is cut into mega-batches of MEGA_BATCHES global batches, each sorted by length, cut into global
batches whose order is then shuffled: batches of similar lengths pad less, and steps still alternate long and
short ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Sequence

import torch


MEGA_BATCHES = 16  # global batches per length-sorted mega-batch


class MicroBatchSampler:
    """Yields this process's micro-batches (lists of dataset indices), step after step, epoch after epoch.

    lengths: each sample's (approximate) length in tokens, to group samples of similar length; None: random order.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        start_epoch: int = 0,
        start_step_in_epoch: int = 0,
        lengths: Sequence[int] | None = None,
    ):
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} usable samples, fewer than optimisation.global_batch_size "
                f"{global_batch_size}: not even one optimiser step"
            )
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} x {world_size} processes"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start_epoch = start_epoch
        self.start_step_in_epoch = start_step_in_epoch
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} sample lengths for {num_samples} samples")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long) if lengths is not None else None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is None:
            return order
        batch = self.global_batch_size
        usable = order[: self.steps_per_epoch * batch]
        grouped = []
        for mega in usable.split(batch * MEGA_BATCHES):
            ranked = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            grouped += list(ranked.split(batch))
        shuffled = torch.randperm(len(grouped), generator=generator)
        return torch.cat([grouped[i] for i in shuffled.tolist()] + [order[len(usable):]])

    def __iter__(self) -> Iterator[list[int]]:
        epoch, step = self.start_epoch, self.start_step_in_epoch
        while True:
            order = self.epoch_order(epoch)
            for s in range(step, self.steps_per_epoch):
                batch = order[s * self.global_batch_size : (s + 1) * self.global_batch_size]
                micro_batches = batch.split(self.micro_batch_size)
                for micro in micro_batches[self.rank :: self.world_size]:
                    yield micro.tolist()
            epoch, step = epoch + 1, 0


class VisionFeatureCollator:
    """Wraps a token/pixel collator and carries cached ViT features through.

    A sample may hold `vision_features`: a list with one (num_images, grid*grid, width) tensor per ViT layer the
    projector reads (what `model.encode_vision` returns for its images), instead of pixel_values. The batch then
    gets `vision_features`: per layer, the samples' tensors concatenated in batch order, like pixel_values.
    """

    def __init__(self, collator: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(samples)
        with_features = [s for s in samples if s.get("vision_features") is not None]
        if not with_features:
            return batch
        if batch.get("pixel_values") is not None:
            raise ValueError("a batch mixes samples with pixel_values and samples with vision_features; use one kind")
        num_layers = len(with_features[0]["vision_features"])
        for sample in with_features:
            features = sample["vision_features"]
            if len(features) != num_layers or any(f.dim() != 3 for f in features):
                shapes = [tuple(f.shape) for f in features]
                raise ValueError(
                    f"sample {sample.get('id')!r}: vision_features must be {num_layers} tensors of shape "
                    f"(num_images, grid*grid, width), got {shapes}"
                )
        batch["vision_features"] = [torch.cat([s["vision_features"][i] for s in with_features]) for i in range(num_layers)]
        return batch


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors, and lists of tensors (vision_features), on `device`; other values as they are."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [v.to(device) for v in value]
        else:
            moved[key] = value
    return moved


__all__ = ["MicroBatchSampler", "VisionFeatureCollator", "move_batch"]
