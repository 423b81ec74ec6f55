"""Frozen-ViT features computed once and shared: every epoch and every projector reads the same hidden states.

A frozen vision tower gives the same hidden states for an image every epoch and for every projector, so the
features of the union of the layers all projectors read are computed once into a safetensors file. A fingerprint
of everything that decides those numbers (tower config and weights, preprocessing, layers, storage dtype, image
bytes and order) is stored with them; a cache whose fingerprint differs is stale and rebuilt, never read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import digest, images_digest, tensors_digest
from ..files import write_file, write_text
from ..vision.tower import VisionTower

FEATURES_FORMAT = "spatial_mllm.vision_features/1"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

ImageTransform = Callable[[list[Image.Image]], torch.Tensor]


# --- frozen-ViT features ------------------------------------------------------------------------------------------
def _probe_images() -> list[Image.Image]:
    """Two fixed non-square gradients: their preprocessed pixels pin down resizing, padding, crop and normalisation."""
    probes = []
    for width, height in ((53, 37), (29, 61)):
        image = Image.new("RGB", (width, height))
        pixels = [((7 * x) % 256, (11 * y) % 256, (5 * (x + y)) % 256) for y in range(height) for x in range(width)]
        image.putdata(pixels)
        probes.append(image)
    return probes


def normalize_layers(layers: Iterable[int], num_states: int) -> tuple[int, ...]:
    """Hidden-state indices as sorted, unique, non-negative numbers (-1 and L name the same state)."""
    normalized = set()
    for layer in layers:
        if not -num_states <= layer < num_states:
            raise ValueError(f"ViT layer {layer} does not exist: the tower has {num_states} hidden states")
        normalized.add(layer % num_states)
    if not normalized:
        raise ValueError("no ViT layers requested for the feature cache")
    return tuple(sorted(normalized))


def vision_features_fingerprint(
    vision_tower: VisionTower,
    image_paths: Sequence[str],
    image_transform: ImageTransform,
    layers: Iterable[int],
    image_root: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
) -> str:
    """What decides the cached numbers: tower config and weights, preprocessing, layers, dtype, images and order."""
    num_states = vision_tower.geometry.num_layers + 1
    config = {
        k: v for k, v in vision_tower.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
    root = Path(image_root) if image_root is not None else Path()
    return digest(
        FEATURES_FORMAT,
        config,
        tensors_digest(vision_tower.model.state_dict()),
        tensors_digest({"probe": image_transform(_probe_images())}),
        normalize_layers(layers, num_states),
        dtype,
        list(image_paths),
        images_digest([root / p for p in image_paths]),
    )


@dataclass
class VisionFeatures:
    """Cached hidden states: `tensors[layer]` is (num_images, grid*grid, width); `rows` maps image path -> row."""

    path: Path
    fingerprint: str
    num_states: int
    rows: dict[str, int]
    tensors: dict[int, torch.Tensor] = field(repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.tensors))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, image_paths: Sequence[str], layers: Iterable[int]) -> list[torch.Tensor]:
        """One (len(image_paths), grid*grid, width) tensor per requested layer, in the order given (as the model's
        `vision_features` argument expects: pass `model.vision_feature_layers`)."""
        try:
            rows = torch.tensor([self.rows[p] for p in image_paths], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"image {err.args[0]!r} is not in the feature cache {self.path}") from None
        result = []
        for layer in layers:
            index = layer % self.num_states if -self.num_states <= layer < self.num_states else None
            if index not in self.tensors:
                raise ValueError(
                    f"ViT layer {layer} is not in the feature cache {self.path} (cached layers: {self.layers}); "
                    "rebuild it with the union of the layers every projector reads"
                )
            result.append(self.tensors[index].index_select(0, rows))
        return result


class StaleFeatureCacheError(ValueError):
    """The cache file was made from a different tower, preprocessing, layer set or image set."""


def _index_path(out_file: Path) -> Path:
    return out_file.with_suffix(".json")


def load_vision_features(out_file: str | os.PathLike, fingerprint: str | None = None) -> VisionFeatures:
    """Load a feature cache; with `fingerprint`, refuse (StaleFeatureCacheError) one made from anything else."""
    out_file = Path(out_file)
    index_file = _index_path(out_file)
    for path in (out_file, index_file):
        if not path.is_file():
            raise FileNotFoundError(f"feature cache file not found: {path}")
    index = json.loads(index_file.read_text())
    with safe_open(str(out_file), framework="pt") as handle:
        stored_fingerprint = (handle.metadata() or {}).get("fingerprint")
        if stored_fingerprint != index.get("fingerprint") or index.get("format") != FEATURES_FORMAT:
            raise StaleFeatureCacheError(f"{out_file} and {index_file} do not belong together (interrupted write?)")
        if fingerprint is not None and stored_fingerprint != fingerprint:
            raise StaleFeatureCacheError(
                f"{out_file} was computed from another tower, preprocessing, layer set or image set"
            )
        tensors = {int(name.split(".")[1]): handle.get_tensor(name) for name in handle.keys()}
    return VisionFeatures(out_file, stored_fingerprint, index["num_states"], index["rows"], tensors)


def _open_image(path: Path, index: int) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image {index} of the feature cache not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"image {index} of the feature cache ({path}) cannot be read: {err}") from None


@torch.no_grad()  # not inference_mode: the cached tensors must be usable by training code afterwards
def _compute_features(
    vision_tower: VisionTower,
    paths: list[Path],
    image_transform: ImageTransform,
    layers: tuple[int, ...],
    batch_size: int,
    storage: torch.dtype,
    progress: Callable[[int, int], None] | None,
) -> dict[int, torch.Tensor]:
    geometry = vision_tower.geometry
    shape = (len(paths), geometry.grid * geometry.grid, geometry.width)
    tensors = {layer: torch.empty(shape, dtype=storage) for layer in layers}
    was_training = vision_tower.training
    vision_tower.eval()
    try:
        for start in range(0, len(paths), batch_size):
            batch = [_open_image(p, start + i) for i, p in enumerate(paths[start : start + batch_size])]
            pixel_values = image_transform(batch)
            if pixel_values.ndim != 4 or pixel_values.shape[0] != len(batch):
                raise ValueError(
                    f"image_transform must return (num_images, 3, H, W) pixel values; got {tuple(pixel_values.shape)} "
                    f"for {len(batch)} images"
                )
            for layer, hidden in zip(layers, vision_tower(pixel_values, layers)):
                tensors[layer][start : start + len(batch)] = hidden.to(storage)
            if progress is not None:
                progress(start + len(batch), len(paths))
    finally:
        vision_tower.train(was_training)
    return tensors


def cache_vision_features(
    vision_tower: VisionTower,
    image_paths: Sequence[str],
    image_transform: ImageTransform,
    layers: Iterable[int],
    out_file: str | os.PathLike,
    batch_size: int = 64,
    image_root: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    progress: Callable[[int, int], None] | None = None,
) -> VisionFeatures:
    """Compute (or reuse, when its fingerprint matches) the tower's hidden states for every image and load them.

    image_paths: paths as the data names them (LLaVA JSON "image"), resolved against `image_root`; they key the rows.
    image_transform: PIL images -> (N, 3, H, W) pixel values, e.g. `processor.preprocess_images` (it is fingerprinted
    by its output on fixed probe images). layers: hidden-state indices, duplicates and negative indices allowed;
    cache the union of what all projectors read (`model.vision_feature_layers`). dtype: "bfloat16" or "float32"
    storage; features are computed in the tower's own dtype. Writes `out_file` (safetensors, one tensor per layer)
    and the index `out_file` with suffix .json (fingerprint, layers, image path -> row).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"feature cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    image_paths = [str(p) for p in image_paths]
    duplicates = sorted(p for p, n in Counter(image_paths).items() if n > 1)
    if duplicates:
        raise ValueError(f"the feature cache needs each image once; repeated: {', '.join(duplicates[:5])}")
    out_file = Path(out_file)
    num_states = vision_tower.geometry.num_layers + 1
    layers = normalize_layers(layers, num_states)
    root = Path(image_root) if image_root is not None else Path()
    fingerprint = vision_features_fingerprint(vision_tower, image_paths, image_transform, layers, image_root, dtype)
    if out_file.is_file() and _index_path(out_file).is_file():
        try:
            return load_vision_features(out_file, fingerprint)
        except StaleFeatureCacheError:
            pass  # rebuilt below

    paths = [root / p for p in image_paths]
    tensors = _compute_features(
        vision_tower, paths, image_transform, layers, batch_size, STORAGE_DTYPES[dtype], progress
    )
    write_file(
        out_file,
        lambda tmp: save_file(
            {f"layer.{layer}": t for layer, t in tensors.items()},
            str(tmp),
            metadata={"fingerprint": fingerprint, "format": FEATURES_FORMAT},
        ),
    )
    index = {
        "format": FEATURES_FORMAT,
        "fingerprint": fingerprint,
        "num_states": num_states,
        "layers": list(layers),
        "dtype": dtype,
        "rows": {path: row for row, path in enumerate(image_paths)},
    }
    write_text(_index_path(out_file), json.dumps(index, indent=1) + "\n")
    return VisionFeatures(out_file, fingerprint, num_states, index["rows"], tensors)


__all__ = [
    "FEATURES_FORMAT",
    "StaleFeatureCacheError",
    "VisionFeatures",
    "cache_vision_features",
    "load_vision_features",
    "normalize_layers",
    "vision_features_fingerprint",
]
