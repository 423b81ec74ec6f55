"""What lies under each ViT patch of a world image, read off the scene graph: the targets of the dense ViT
objective and of the per-patch probes.

An object's pixels are drawn exactly as the renderer draws them (same outline, same 4x supersampling) into a label
map; a patch belongs to the object covering the largest share of it when that share reaches `min_cover`, else to
the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..world.render import SUPERSAMPLE, draw_object
from ..world.scene import COLORS, SHAPES, SIZES, Scene

COLOR_NAMES = tuple(COLORS)
SIZE_NAMES = tuple(SIZES)
ATTRIBUTES = {"color": COLOR_NAMES, "shape": SHAPES, "size": SIZE_NAMES}
BACKGROUND = -1


def label_map(scene: Scene) -> np.ndarray:
    """(height*S, width*S) uint8 map at the renderer's supersampling S: 0 background, k+1 where object k is drawn."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (scene.width * s, scene.height * s), 0)
    draw = ImageDraw.Draw(canvas)
    for k, obj in enumerate(scene.objects):
        draw_object(draw, obj, fill=k + 1)
    return np.asarray(canvas)


def patch_objects(scene: Scene, grid: int, min_cover: float = 0.15) -> np.ndarray:
    """(grid*grid,) row-major: the index of the object covering each patch (largest share >= min_cover) or -1."""
    if scene.width != scene.height or scene.width % grid:
        raise ValueError(f"scene {scene.id}: a {scene.width}x{scene.height} canvas does not split into "
                         f"{grid}x{grid} patches")
    labels = label_map(scene)
    side = labels.shape[0] // grid
    blocks = labels.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, side * side)
    if not scene.objects:
        return np.full(grid * grid, BACKGROUND)
    shares = np.stack([(blocks == k + 1).mean(1) for k in range(len(scene.objects))], 1)
    return np.where(shares.max(1) >= min_cover, shares.argmax(1), BACKGROUND)


def centre_patch(x: float, y: float, width: int, height: int, grid: int) -> int:
    """Row-major index of the patch holding the point (x, y) of a width x height image cut into grid x grid."""
    column = min(int(x * grid / width), grid - 1)
    row = min(int(y * grid / height), grid - 1)
    return row * grid + column


@dataclass(frozen=True)
class DenseTargets:
    """Per-patch targets of a batch of scenes, each (N, grid*grid): class 0 is the background, then the object's
    colour / shape / size index + 1; centre_x/centre_y: the object's centre as a fraction of the canvas (-1 on
    background patches)."""

    color: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    centre_x: torch.Tensor
    centre_y: torch.Tensor


def dense_targets(scenes: list[Scene], grid: int, min_cover: float = 0.15) -> DenseTargets:
    rows = {name: [] for name in ("color", "shape", "size", "centre_x", "centre_y")}
    for scene in scenes:
        owners = patch_objects(scene, grid, min_cover)
        values = {name: [] for name in rows}
        for owner in owners:
            if owner == BACKGROUND:
                for name in rows:
                    values[name].append(0 if name in ATTRIBUTES else -1.0)
                continue
            obj = scene.objects[owner]
            for name, vocabulary in ATTRIBUTES.items():
                values[name].append(1 + vocabulary.index(getattr(obj, name)))
            values["centre_x"].append(obj.x / scene.width)
            values["centre_y"].append(obj.y / scene.height)
        for name in rows:
            rows[name].append(values[name])
    return DenseTargets(**{name: torch.tensor(value) for name, value in rows.items()})
