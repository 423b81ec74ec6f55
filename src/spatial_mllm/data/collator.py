"""Batches LlavaDataset samples into the keyword arguments of the model's forward."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from ..model.conversation import IGNORE_INDEX


class DataCollator:
    """Pads input_ids (pad_token_id), labels (-100) and attention_mask (0) on the chosen side, and concatenates the
    pixel_values of the samples that have images, in batch order: (total images, 3, H, W), or None if there are none.

    Right padding is the usual choice for training; left padding keeps every prompt's last token at the end of
    its row, which batched generation needs. pad_to_multiple_of rounds the padded length up (as transformers'
    collators do): fewer distinct shapes, which CPU kernels compile and cache one by one.
    """

    def __init__(self, pad_token_id: int, padding_side: Literal["left", "right"] = "right",
                 pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row) :] = row
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        ids = [s["input_ids"] for s in samples]
        images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        return {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(row) for row in ids], 0),
            "labels": self._pad([s["labels"] for s in samples], IGNORE_INDEX),
            "pixel_values": torch.cat(images) if images else None,
        }
