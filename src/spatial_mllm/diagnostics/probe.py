"""Per-patch linear probes: does a ViT's patch under an object say that object's colour, shape and size?

For every object of a world scene, the features of the patch holding the object's centre, at each hidden state
asked for, go into a multinomial logistic regression per attribute, fit on one split's images and scored on
another's, beside the majority-class baseline. Works on any CLIP/SigLIP folder: images go through the folder's
own image processor, and the centre patch is found on the tower's grid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..demo.world.make import SCENES_FILE
from ..demo.world.scene import Scene
from ..demo.encoders.patch_labels import ATTRIBUTES, centre_patch


@dataclass(frozen=True)
class ProbeData:
    """Centre-patch rows of one split: image index, patch index, and per attribute the class index."""

    images: list[Path]
    image_rows: torch.Tensor  # (objects,)
    patch_rows: torch.Tensor  # (objects,)
    labels: dict[str, torch.Tensor]  # attribute -> (objects,)


def read_scenes(world: str | os.PathLike, split: str, limit: int | None = None) -> list[Scene]:
    """The first `limit` scenes of `split` in the world folder's scenes.jsonl."""
    path = Path(world) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {world} is not a world folder (spatial-mllm data make-world)")
    scenes = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            record = json.loads(line)
            if record.get("split") == split:
                try:
                    scenes.append(Scene.from_dict(record))
                except (KeyError, TypeError) as err:
                    raise ValueError(f"{path} line {number}: not a scene record ({err})") from None
                if limit is not None and len(scenes) == limit:
                    break
    if not scenes:
        raise ValueError(f"{path} holds no scene of split {split!r}")
    return scenes


def probe_data(world: str | os.PathLike, scenes: list[Scene], grid: int) -> ProbeData:
    images, image_rows, patch_rows = [], [], []
    labels = {name: [] for name in ATTRIBUTES}
    for index, scene in enumerate(scenes):
        images.append(Path(world) / scene.image)
        for obj in scene.objects:
            image_rows.append(index)
            patch_rows.append(centre_patch(obj.x, obj.y, scene.width, scene.height, grid))
            for name, vocabulary in ATTRIBUTES.items():
                labels[name].append(vocabulary.index(getattr(obj, name)))
    return ProbeData(images, torch.tensor(image_rows), torch.tensor(patch_rows),
                     {name: torch.tensor(values) for name, values in labels.items()})


@torch.inference_mode()
def patch_features(tower, transform, images: list[Path], layers: tuple[int, ...], batch_size: int = 64,
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Per layer, (N, grid*grid, width) float32 patch features of the images (read from disk, in order)."""
    chunks: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in range(0, len(images), batch_size):
        pictures = []
        for path in images[start : start + batch_size]:
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path}")
            with Image.open(path) as picture:
                pictures.append(picture.convert("RGB"))
        pixel_values = transform(pictures).to(device)
        for chunk, features in zip(chunks, tower(pixel_values, layers)):
            chunk.append(features.float().cpu())
    return [torch.cat(chunk) for chunk in chunks]


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, l2: float = 1e-3,
                     iterations: int = 200) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, deterministic);
    returns (linear layer, feature mean, feature scale)."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / scale
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear, mean, scale


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Accuracy on (test_x, test_y) of a linear probe fit on (train_x, train_y)."""
    linear, mean, scale = fit_linear_probe(train_x, train_y, classes)
    with torch.no_grad():
        return (linear((test_x - mean) / scale).argmax(1) == test_y).float().mean().item()


def majority_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy on test_y of always answering train_y's most frequent class."""
    return (test_y == torch.bincount(train_y).argmax()).float().mean().item()


def probe_tower(tower, transform, world: str | os.PathLike, layers: tuple[int, ...], fit_split: str = "train",
                score_split: str = "test", fit_images: int = 1000, score_images: int = 300,
                device: str | torch.device = "cpu") -> dict:
    """Centre-patch probes of colour, shape and size at each hidden state in `layers`.

    Returns {"layers": {layer: {attribute: accuracy}}, "majority": {attribute: accuracy}, "objects": {split: n},
    "images": {split: n}}: probes fit on the first `fit_images` scenes of `fit_split`, scored on the first
    `score_images` of `score_split`.
    """
    grid = tower.geometry.grid
    fit = probe_data(world, read_scenes(world, fit_split, fit_images), grid)
    score = probe_data(world, read_scenes(world, score_split, score_images), grid)
    fit_features = patch_features(tower, transform, fit.images, layers, device=device)
    score_features = patch_features(tower, transform, score.images, layers, device=device)
    objects = {fit_split: len(fit.image_rows), score_split: len(score.image_rows)}
    result = {"layers": {}, "majority": {}, "objects": objects,
              "images": {fit_split: len(fit.images), score_split: len(score.images)}}
    for layer, train_all, test_all in zip(layers, fit_features, score_features):
        train_x = train_all[fit.image_rows, fit.patch_rows]
        test_x = test_all[score.image_rows, score.patch_rows]
        result["layers"][layer] = {
            name: probe_accuracy(train_x, fit.labels[name], test_x, score.labels[name], len(vocabulary))
            for name, vocabulary in ATTRIBUTES.items()
        }
    result["majority"] = {name: majority_accuracy(fit.labels[name], score.labels[name]) for name in ATTRIBUTES}
    return result
