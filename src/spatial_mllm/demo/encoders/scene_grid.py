"""The scene as a grid of cells in the LLM's own embeddings: the form a patch projector shows the LLM.

From a written description the LLM reads an object's place off its digits ("a red circle at x 2 y 7"). From an
image it must read the place off the order of the visual tokens, one per patch, row by row; stage 2 would teach that
from scratch. So part of the pretraining corpus shows the scene in place of `<image>` as grid cells: cell k is the
mean input embedding of the size, colour and shape words of the object under patch k (`patch_objects`, as the
ViT's dense objective labels it), or the `<image>` token's own embedding on background. A patch projector can make
such a cell from a patch feature by a linear map (the shipped ViT's patches give colour, shape and size linearly at
99-100%). The grid is also shown pooled 2x2 (`pooled_sides`: SAEP's 4x4 tokens), so that the LLM is not taught one
projector's layout only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...model.configuration import IMAGE_TOKEN
from ..world.scene import Scene
from .patch_labels import BACKGROUND, patch_objects

CELL_WORDS = ("size", "color", "shape")  # the attributes a cell's embedding averages


def word_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The id of ` word` (with its leading space, as in running text), which must be one token."""
    ids = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the world word {word!r} into {len(ids)} tokens; grid cells need it "
                         "whole (train it with spatial_mllm.demo.encoders.phrase_tokenizer)")
    return ids[0]


def cell_word_ids(scene: Scene, grid: int, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """(grid*grid, 3) row-major: the size, colour and shape word ids of the object under each patch, or the
    `<image>` token id three times on background."""
    background = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    words = [[word_id(tokenizer, getattr(obj, name)) for name in CELL_WORDS] for obj in scene.objects]
    return torch.tensor([words[owner] if owner != BACKGROUND else [background] * len(CELL_WORDS)
                         for owner in patch_objects(scene, grid)])


def cell_embeddings(embedding: nn.Module, cell_ids: torch.Tensor, side: int) -> torch.Tensor:
    """(rows, side*side, width) from cell ids (rows, grid*grid, 3): each cell's mean word embedding, average-pooled
    from the grid down to `side` x `side` (side must divide the grid)."""
    rows, cells, _ = cell_ids.shape
    grid = round(cells**0.5)
    if grid * grid != cells or grid % side:
        raise ValueError(f"cannot pool a grid of {cells} cells to {side}x{side}")
    embedded = embedding(cell_ids).mean(2)  # (rows, grid*grid, width)
    if side == grid:
        return embedded
    width = embedded.shape[-1]
    square = embedded.transpose(1, 2).reshape(rows, width, grid, grid)
    pooled = nn.functional.avg_pool2d(square, grid // side)
    return pooled.reshape(rows, width, side * side).transpose(1, 2)


def place_cells(input_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                cells: torch.Tensor) -> torch.Tensor:
    """input_embeds with each row's `<image>` positions holding that row's cells, in order."""
    mask = input_ids == image_token_id
    if int(mask.sum()) != cells.shape[0] * cells.shape[1]:
        raise ValueError(f"{int(mask.sum())} <image> positions for {cells.shape[0]} x {cells.shape[1]} grid cells")
    return input_embeds.masked_scatter(mask.unsqueeze(-1), cells.to(input_embeds.dtype))


__all__ = ["CELL_WORDS", "cell_embeddings", "cell_word_ids", "place_cells", "word_id"]
