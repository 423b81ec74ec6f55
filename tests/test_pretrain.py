"""Pretraining the built-in world's encoders (tiny CLIP, tiny Llama), their cache, and the frozen-ViT feature cache."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel

from spatial_mllm.data.dataset import DataError
from spatial_mllm.model import VICUNA_SYSTEM
from spatial_mllm.demo.tokenizer import train_world_tokenizer
from spatial_mllm.model import build_model, image_processor_for
from spatial_mllm.cache import cached_folder
from spatial_mllm.training.feature_cache import StaleFeatureCacheError, cache_vision_features, load_vision_features
from spatial_mllm.demo.pretrain_llm import conversation_texts, pack_texts, pretrain_llm, pretrain_llm_cached
from spatial_mllm.demo.pretrain_vision import (
    ClipPretrainConfig,
    encode_captions,
    image_to_text_retrieval,
    pretrain_clip,
    pretrain_clip_cached,
)
from spatial_mllm.vision import VisionTower
from tiny import tiny_clip, tiny_model

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
TINY_CLIP = ClipPretrainConfig(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=1,
    text_heads=2, projection_dim=16, steps=25, batch_size=8, lr=3e-3, warmup_steps=2, held_out=4,
)  # fmt: skip


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy machine waiting threads spin (10x slower, measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, world):
    _, _, captions = world
    texts = captions + [f"{VICUNA_SYSTEM} USER: What color is the circle? ASSISTANT: red"]
    return train_world_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, world, tokenizer) -> tuple[Path, dict]:
    folder, paths, captions = world
    out = tmp_path_factory.mktemp("clip")
    result = pretrain_clip([folder / p for p in paths], captions, tokenizer, out, TINY_CLIP)
    assert result.path == out
    return out, result.metrics


LLM_OPTIONS = dict(
    hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, block_size=32, steps=30, batch_size=4, lr=1e-2
)


def llm_texts() -> list[str]:
    rng = random.Random(1)
    return [
        f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the {rng.choice(SHAPES)}? "
        f"ASSISTANT: {rng.choice(list(COLORS))}</s>"
        for _ in range(40)
    ]


# --- CLIP -------------------------------------------------------------------------------------------------------------
def test_clip_contrastive_loss_falls_and_metrics_are_recorded(clip_folder):
    folder, metrics = clip_folder
    assert metrics["final_loss"] < 0.8 * metrics["initial_loss"]
    assert metrics["train_images"] == 20 and metrics["retrieval_images"] == 4
    assert 0 <= metrics["retrieval_top1"] <= 1 and 0.25 <= metrics["retrieval_chance"] <= 1
    assert json.loads((folder / "pretraining.json").read_text())["metrics"] == metrics


def test_clip_folder_loads_as_vision_tower_with_trained_weights(clip_folder, world):
    folder, _ = clip_folder
    tower = VisionTower.from_pretrained(str(folder))
    assert (tower.geometry.grid, tower.geometry.width, tower.geometry.num_layers) == (4, 32, 2)
    clip = CLIPModel.from_pretrained(folder)
    saved = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    loaded = {k.removeprefix("vision_model."): v for k, v in tower.model.state_dict().items()}
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)

    processor = image_processor_for(str(folder))
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    root, paths, _ = world
    pixels = processor(images=[Image.open(root / paths[0]).convert("RGB")], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    hidden = tower(pixels, (-2,))[0]
    assert hidden.shape == (1, 16, 32)


def test_pretrained_encoders_build_a_working_model(clip_folder, tokenizer, tmp_path):
    llm = pretrain_llm(llm_texts(), tokenizer, tmp_path / "llm", **LLM_OPTIONS).path
    model, processor = build_model(str(clip_folder[0]), str(llm), str(llm), "mlp2x_gelu")
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer)  # <image> already there
    image = Image.new("RGB", (50, 30), (200, 20, 20))
    batch = processor(images=[image], text=["USER: <image>\nWhat color? ASSISTANT:"])
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_captions_end_with_the_text_towers_own_end_token(tokenizer):
    input_ids, mask = encode_captions(["a red circle", "a large blue square, a small green triangle"], tokenizer)
    lengths = mask.sum(1)
    assert [int(input_ids[i, lengths[i] - 1]) for i in range(2)] == [len(tokenizer)] * 2
    assert int((input_ids == len(tokenizer)).sum()) == 2
    with pytest.raises(ValueError, match="caption 1 is empty"):
        encode_captions(["a red circle", "  "], tokenizer)


class FixedEmbeddings(torch.nn.Module):
    """Stands in for CLIPModel: image i embeds to image_vectors[i], a caption's token ids to text_vectors[ids]."""

    def __init__(self, image_vectors: torch.Tensor, text_vectors: dict[tuple[int, ...], torch.Tensor]):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.image_vectors, self.text_vectors = image_vectors, text_vectors

    def get_image_features(self, pixel_values):
        return self.image_vectors[pixel_values[:, 0, 0, 0].long()]

    def get_text_features(self, input_ids, attention_mask):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        return torch.stack([self.text_vectors[row] for row in rows])


def test_retrieval_counts_identical_captions_as_hits(tokenizer):
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    axes = torch.eye(3)
    text_vectors = {}
    for axis, caption in zip(axes, ["a red circle", "a blue square", "a green triangle"]):
        ids, _ = encode_captions([caption], tokenizer)
        text_vectors[tuple(ids[0].tolist())] = axis
    # Images 0 and 2 look like "a red circle" (hits for both), image 1 too (a miss), image 3 like its caption.
    image_vectors = torch.stack([axes[0], axes[0], axes[0], axes[2]])
    pixels = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    metrics = image_to_text_retrieval(FixedEmbeddings(image_vectors, text_vectors), pixels, captions, tokenizer)
    assert metrics == {"retrieval_top1": 0.75, "retrieval_chance": 1 / 3, "retrieval_images": 4.0}


def test_clip_input_errors_name_the_problem(world, tokenizer, tmp_path):
    folder, paths, captions = world
    with pytest.raises(ValueError, match="24 images but 23 captions"):
        pretrain_clip([folder / p for p in paths], captions[:-1], tokenizer, tmp_path, TINY_CLIP)
    missing = [folder / p for p in paths]
    missing[5] = folder / "images/nope.png"
    with pytest.raises(FileNotFoundError, match="image 5 not found"):
        pretrain_clip(missing, captions, tokenizer, tmp_path, TINY_CLIP)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ClipPretrainConfig(image_size=30, patch_size=8)


def test_cached_clip_is_reused_only_for_the_same_key(world, tokenizer, tmp_path):
    folder, paths, captions = world
    images = [folder / p for p in paths]
    first = pretrain_clip_cached(tmp_path, images, captions, tokenizer, TINY_CLIP, steps=3)
    again = pretrain_clip_cached(tmp_path, images, captions, tokenizer, TINY_CLIP, steps=3)
    assert not first.reused and again.reused
    assert again.path == first.path and again.metrics == first.metrics
    other = pretrain_clip_cached(tmp_path, images, captions[::-1], tokenizer, TINY_CLIP, steps=3)
    assert not other.reused and other.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, other.path.name])  # no temp left


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


# --- LLM --------------------------------------------------------------------------------------------------------------
def test_llm_loss_falls_and_folder_loads_with_auto_classes(tokenizer, tmp_path):
    texts = llm_texts()
    result = pretrain_llm(texts, tokenizer, tmp_path / "llm", **LLM_OPTIONS)
    metrics = result.metrics
    assert metrics["final_loss"] < 0.7 * metrics["initial_loss"]
    assert metrics["held_out_perplexity"] == pytest.approx(torch.tensor(metrics["held_out_loss"]).exp().item())

    model = AutoModelForCausalLM.from_pretrained(result.path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(loaded_tokenizer) == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    stream = pack_texts(texts[:4], loaded_tokenizer)[None]
    with torch.no_grad():
        loss = model(input_ids=stream, labels=stream).loss.item()
    assert loss < metrics["initial_loss"] - 1.0  # the saved weights are the trained ones


def test_pack_texts_delimits_documents_once(tokenizer):
    stream = pack_texts(["USER: hi ASSISTANT: red</s>", "a red circle"], tokenizer).tolist()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert stream[0] == bos and stream[-1] == eos
    assert stream.count(bos) == 2 and stream.count(eos) == 2  # the first text's own </s> is not doubled
    assert tokenizer.decode(stream, skip_special_tokens=True) == "USER: hi ASSISTANT: reda red circle"
    with pytest.raises(ValueError, match="text 1 of the language corpus is empty"):
        pack_texts(["ok", ""], tokenizer)


def test_conversation_texts_render_the_training_format(world, tokenizer, tmp_path):
    folder, paths, _ = world
    records = [
        {"id": "a", "image": paths[0], "conversations": [
            {"from": "human", "value": "What color is it?\n<image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "How many sides?"}, {"from": "gpt", "value": "4"}]},
    ]  # fmt: skip
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    texts = conversation_texts(data, tokenizer, folder)
    assert texts == [
        f"{VICUNA_SYSTEM} USER: <image>\nWhat color is it? ASSISTANT: red</s>",
        f"{VICUNA_SYSTEM} USER: How many sides? ASSISTANT: 4</s>",
    ]
    records[1]["conversations"][1]["from"] = "bing"
    data.write_text(json.dumps(records))
    with pytest.raises(DataError, match="1.*unknown role 'bing'"):
        conversation_texts(data, tokenizer, folder)


def test_cached_llm_reuse(tokenizer, tmp_path):
    options = dict(LLM_OPTIONS, steps=2)
    first = pretrain_llm_cached(tmp_path, llm_texts(), tokenizer, **options)
    again = pretrain_llm_cached(tmp_path, llm_texts(), tokenizer, **options)
    changed = pretrain_llm_cached(tmp_path, llm_texts(), tokenizer, **dict(options, seed=1))
    assert (first.reused, again.reused, changed.reused) == (False, True, False)
    assert again.path == first.path != changed.path
    assert AutoTokenizer.from_pretrained(again.path).get_vocab() == tokenizer.get_vocab()


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
