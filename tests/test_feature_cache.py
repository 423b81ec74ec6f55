"""The frozen-ViT feature cache (computed once, shared by every projector) and the digest-keyed folder cache."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from spatial_mllm.cache import cached_folder
from spatial_mllm.model import image_processor_for
from spatial_mllm.training.feature_cache import StaleFeatureCacheError, cache_vision_features, load_vision_features
from spatial_mllm.vision import VisionTower
from fixtures.training import one_thread  # noqa: F401  (autouse: one torch thread)
from tiny import tiny_clip, tiny_model

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")


def scene(rng: random.Random, side: int = 40) -> tuple[Image.Image, str]:
    """A dark canvas with one or two coloured shapes, and its object-list caption."""
    image = Image.new("RGB", (side, side), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(rng.randint(1, 2)):
        color, shape, size = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(("small", "large"))
        r = side // 8 if size == "small" else side // 4
        x, y = rng.randint(r, side - r), rng.randint(r, side - r)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=COLORS[color])
        parts.append(f"a {size} {color} {shape}")
    return image, ", ".join(parts)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """A folder of 24 PNG scenes: (folder, relative image paths, captions)."""
    folder = tmp_path_factory.mktemp("world")
    (folder / "images").mkdir()
    rng = random.Random(0)
    paths, captions = [], []
    for i in range(24):
        image, caption = scene(rng)
        paths.append(f"images/{i:03d}.png")
        image.save(folder / paths[-1])
        captions.append(caption)
    return folder, paths, captions


def test_failed_build_leaves_no_folder(tmp_path):
    def fail(tmp: Path) -> None:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    key = "0123456789abcdef0123456789"
    with pytest.raises(RuntimeError):
        cached_folder(tmp_path, "entry", key, fail)
    assert list(tmp_path.iterdir()) == []
    built = cached_folder(tmp_path, "entry", key, lambda tmp: (tmp / "done").write_text("y"))
    assert not built.reused and built.path == tmp_path / f"entry-{key[:20]}"
    assert cached_folder(tmp_path, "entry", key, fail).reused  # exists: not rebuilt
    assert (built.path / "done").read_text() == "y"
    (tmp_path / "plain").mkdir()
    assert built.path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not left private


# --- frozen-ViT feature cache ---------------------------------------------------------------------------------------
@pytest.fixture()
def tower_and_transform():
    torch.manual_seed(0)
    config = tiny_clip(image_size=32, patch_size=8, layers=3)
    tower = VisionTower.from_config(config).eval()
    processor = image_processor_for(config)
    return tower, lambda images: processor(images=images, return_tensors="pt")["pixel_values"]


def direct_features(tower, transform, folder, paths, layers):
    images = [Image.open(folder / p).convert("RGB") for p in paths]
    with torch.no_grad():
        return tower(transform(images), layers)


def test_feature_cache_equals_direct_computation(world, tower_and_transform, tmp_path):
    folder, paths, _ = world
    tower, transform = tower_and_transform
    out = tmp_path / "features.safetensors"
    cache = cache_vision_features(
        tower, paths, transform, (2, -2, 1), out, batch_size=5, image_root=folder, dtype="float32"
    )
    assert cache.layers == (1, 2) and len(cache) == 24
    assert cache.tensors[2].shape == (24, 16, 32) and cache.tensors[2].dtype == torch.float32
    wanted = [paths[7], paths[0], paths[23]]
    expected = direct_features(tower, transform, folder, wanted, (2, 1))
    for got, want in zip(cache.lookup(wanted, (-2, 1)), expected):  # -2 is hidden state 2 of a 3-block tower
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    (tmp_path / "plain.json").write_text("{}")
    assert out.stat().st_mode == out.with_suffix(".json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
    index = json.loads(out.with_suffix(".json").read_text())
    assert index["rows"][paths[7]] == 7 and index["layers"] == [1, 2]
    loaded = load_vision_features(out, cache.fingerprint)
    assert all(torch.equal(loaded.tensors[k], cache.tensors[k]) for k in (1, 2))

    bf16 = cache_vision_features(tower, paths, transform, (2,), tmp_path / "bf16.safetensors", image_root=folder)
    assert bf16.tensors[2].dtype == torch.bfloat16
    assert torch.equal(bf16.lookup(wanted, (2,))[0], expected[0].to(torch.bfloat16))


def test_feature_cache_is_reused_and_rebuilt_when_stale(world, tower_and_transform, tmp_path):
    folder, paths, _ = world
    tower, transform = tower_and_transform
    out = tmp_path / "features.safetensors"
    first = cache_vision_features(tower, paths, transform, (2,), out, image_root=folder)
    stamp = out.stat().st_mtime_ns
    again = cache_vision_features(tower, paths, transform, (2,), out, image_root=folder)
    assert again.fingerprint == first.fingerprint and out.stat().st_mtime_ns == stamp

    with torch.no_grad():
        tower.model.encoder.layers[0].mlp.fc1.weight[0, 0] += 1.0
    changed = cache_vision_features(tower, paths, transform, (2,), out, image_root=folder)
    assert changed.fingerprint != first.fingerprint
    expected = direct_features(tower, transform, folder, paths[:3], (2,))[0].to(torch.bfloat16)
    assert torch.equal(changed.lookup(paths[:3], (2,))[0], expected)
    with pytest.raises(StaleFeatureCacheError):
        load_vision_features(out, first.fingerprint)

    fingerprints = {changed.fingerprint}
    double = lambda images: 2 * transform(images)  # noqa: E731 - another preprocessing
    fingerprints.add(cache_vision_features(tower, paths, double, (2,), out, image_root=folder).fingerprint)
    fingerprints.add(cache_vision_features(tower, paths, transform, (1, 2), out, image_root=folder).fingerprint)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "images/edited.png")
    edited = [*paths[:-1], "images/edited.png"]
    fingerprints.add(cache_vision_features(tower, edited, transform, (1, 2), out, image_root=folder).fingerprint)
    assert len(fingerprints) == 4
    os.remove(folder / "images/edited.png")


def test_cached_features_drive_the_model_like_pixels(world, tmp_path):
    folder, paths, _ = world
    model, processor = tiny_model("mlp2x_gelu")
    out = tmp_path / "features.safetensors"
    cache = cache_vision_features(
        model.vision_tower, paths, processor.image_transform, model.vision_feature_layers, out,
        image_root=folder, dtype="float32",
    )  # fmt: skip
    image = Image.open(folder / paths[3]).convert("RGB")
    batch = processor(images=[image], text=["USER: <image>\nWhat color? ASSISTANT:"])
    with torch.no_grad():
        from_pixels = model(**batch).logits
        from_cache = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            vision_features=cache.lookup([paths[3]], model.vision_feature_layers),
        ).logits
    torch.testing.assert_close(from_cache, from_pixels, rtol=1e-4, atol=1e-5)


def test_feature_cache_errors_name_the_problem(world, tower_and_transform, tmp_path):
    folder, paths, _ = world
    tower, transform = tower_and_transform
    out = tmp_path / "features.safetensors"
    with pytest.raises(ValueError, match="ViT layer 7 does not exist"):
        cache_vision_features(tower, paths, transform, (7,), out, image_root=folder)
    with pytest.raises(ValueError, match="repeated: images/000.png"):
        cache_vision_features(tower, [paths[0], paths[0]], transform, (2,), out, image_root=folder)
    with pytest.raises(FileNotFoundError, match="image 1 not found"):
        cache_vision_features(tower, [paths[0], "images/missing.png"], transform, (2,), out, image_root=folder)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_vision_features(tower, paths, transform, (2,), out, image_root=folder, dtype="float16")
    cache = cache_vision_features(tower, paths[:2], transform, (2,), out, image_root=folder)
    with pytest.raises(ValueError, match="'images/023.png' is not in the feature cache"):
        cache.lookup([paths[23]], (2,))
    with pytest.raises(ValueError, match="ViT layer 1 is not in the feature cache"):
        cache.lookup([paths[0]], (1,))
    with pytest.raises(FileNotFoundError, match="feature cache file not found"):
        load_vision_features(tmp_path / "none.safetensors")
