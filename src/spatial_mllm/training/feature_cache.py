"""Work done once and reused: content fingerprints, atomically written cache folders, and frozen-ViT features.

A frozen vision tower gives the same hidden states for an image every epoch and for every projector, so the
features of the union of the layers all projectors read are computed once into a safetensors file. A fingerprint
of everything that decides those numbers (tower config and weights, preprocessing, layers, storage dtype, image
bytes and order) is stored with them; a cache whose fingerprint differs is stale and rebuilt, never read.

Pretrained encoders are cached the same way: a folder named by a key (config + data fingerprint + code version)
is reused when it exists. Folders and files are written under a temporary name, then renamed, so a crash never
leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from ..vision.tower import VisionTower

FEATURES_FORMAT = "spatial_mllm.vision_features/1"
PRETRAINING_FILE = "pretraining.json"  # config and metrics of a pretrained encoder folder
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

ImageTransform = Callable[[list[Image.Image]], torch.Tensor]


# --- fingerprints -------------------------------------------------------------------------------------------------
def digest(*parts: Any) -> str:
    """sha256 of JSON-serialisable parts (dict keys sorted), e.g. a config dict and other digests."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of named tensors: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def images_digest(images: Sequence[Image.Image | str | os.PathLike]) -> str:
    """Digest of images in order: file bytes for paths, mode + size + pixels for PIL images."""
    h = hashlib.sha256()
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            h.update(f"{image.mode}|{image.size}|".encode())
            h.update(image.tobytes())
        elif Path(image).is_file():
            h.update(Path(image).read_bytes())
        else:
            raise FileNotFoundError(f"image {index} not found: {image}")
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of what decides token ids: the vocabulary, special tokens and (for fast tokenizers) the pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else ""
    return digest(sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, pipeline)


def code_version(*source_files: str | os.PathLike) -> str:
    """Digest of source files (pass a module's `__file__`): editing the code that made a cache invalidates it."""
    from spatial_mllm import __version__

    return digest(__version__, [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in source_files])


# --- atomically written cache entries -----------------------------------------------------------------------------
def build_folder_once(folder: str | os.PathLike, build: Callable[[Path], None]) -> bool:
    """Run `build(tmp)` into a fresh temporary folder and rename it to `folder`, unless `folder` already exists.

    Returns True when it built. If another process finished the same folder first, its copy is kept.
    """
    folder = Path(folder)
    if folder.is_dir():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the published folder gets the usual mode
        build(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        return False  # lost a race: an identical folder appeared meanwhile
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make files private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass(frozen=True)
class PretrainResult:
    """A pretrained encoder folder, its metrics, and whether it came from the cache."""

    path: Path
    metrics: dict[str, float]
    reused: bool = False


def write_pretraining_record(folder: Path, config: dict[str, Any], metrics: dict[str, float]) -> None:
    (folder / PRETRAINING_FILE).write_text(json.dumps({"config": config, "metrics": metrics}, indent=1) + "\n")


def read_pretraining_metrics(folder: str | os.PathLike) -> dict[str, float]:
    path = Path(folder) / PRETRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder written by spatial_mllm pretraining")
    return json.loads(path.read_text())["metrics"]


def cached_pretraining(
    cache_dir: str | os.PathLike, name: str, key: str, train: Callable[[Path], Any]
) -> PretrainResult:
    """Reuse `cache_dir/<name>-<key>` when present, else `train(tmp_folder)` and publish it under that name."""
    folder = Path(cache_dir) / f"{name}-{key[:20]}"
    built = build_folder_once(folder, train)
    return PretrainResult(folder, read_pretraining_metrics(folder), reused=not built)


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
    _write_atomically(
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
    _write_atomically(_index_path(out_file), lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"))
    return VisionFeatures(out_file, fingerprint, num_states, index["rows"], tensors)


__all__ = [
    "PretrainResult",
    "StaleFeatureCacheError",
    "VisionFeatures",
    "build_folder_once",
    "cache_vision_features",
    "cached_pretraining",
    "code_version",
    "digest",
    "images_digest",
    "load_vision_features",
    "normalize_layers",
    "read_pretraining_metrics",
    "tensors_digest",
    "tokenizer_digest",
    "vision_features_fingerprint",
    "write_pretraining_record",
]
