"""A running batch's KV cache and attention mask, kept left-aligned so that rows can join and leave between decode
steps (continuous batching) on transformers' own `DynamicCache`: joining left-pads the shorter side, leaving
selects rows, and columns that have become padding in every row are dropped so the cache never outgrows its
longest live row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def mergeable(cache: DynamicCache) -> bool:
    """Plain full-attention layers only: sliding-window or recurrent layers keep state that padding would corrupt."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class BatchState:
    cache: DynamicCache
    attention_mask: torch.Tensor  # (rows, cached columns + 0), 1 = real token

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    def positions_of_next(self) -> torch.Tensor:
        """Position id of the token each row feeds next: the count of its real tokens so far."""
        return self.attention_mask.sum(dim=-1, keepdim=True)

    def extend(self) -> None:
        """One more real column for every row (before a decode step)."""
        ones = self.attention_mask.new_ones((self.rows, 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self._trim()

    def _trim(self) -> None:
        live = self.attention_mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else self.attention_mask.shape[1]
        if first == 0:
            return
        self.attention_mask = self.attention_mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]

    def join(self, other: "BatchState") -> None:
        """`other`'s rows appended after ours, the shorter side left-padded with masked zeros."""
        mine, theirs = self.attention_mask.shape[1], other.attention_mask.shape[1]
        width = max(mine, theirs)
        pad_mine, pad_theirs = width - mine, width - theirs
        for layer, new in zip(self.cache.layers, other.cache.layers):
            layer.keys = torch.cat([F.pad(layer.keys, (0, 0, pad_mine, 0)), F.pad(new.keys, (0, 0, pad_theirs, 0))])
            layer.values = torch.cat(
                [F.pad(layer.values, (0, 0, pad_mine, 0)), F.pad(new.values, (0, 0, pad_theirs, 0))]
            )
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (pad_mine, 0)), F.pad(other.attention_mask, (pad_theirs, 0))]
        )


__all__ = ["BatchState", "mergeable"]
