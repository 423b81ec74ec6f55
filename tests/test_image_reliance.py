"""Image reliance: the loss of the supervised tokens with each sample's own image and with another sample's, checked
against the model's own loss, on a model blind to the image, and through `spatial-mllm image-reliance`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from spatial_mllm import cli
from spatial_mllm.data.dataset import LlavaDataset
from spatial_mllm.demo.tokenizer import train_world_tokenizer
from spatial_mllm.evaluation.image_reliance import OtherImages, image_reliance
from spatial_mllm.model import build_model
from spatial_mllm.training.engine import make_collator
from tiny import sharpened, tiny_clip, tiny_llama

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
IMAGE_RECORDS = [0, 2, 4, 5, 6, 7]  # the records of write_data that hold a readable image
BROKEN = {1: "corrupt.png", 8: "missing.png"}
# Whose image each of those samples gets with shift 1: the next one's, except the last (image 0 again), which skips
# sample 0 (its own picture) for sample 1.
DONORS = [1, 2, 3, 4, 5, 1]


def colour_record(index: int) -> dict:
    colour = list(COLOURS)[index % len(COLOURS)]
    return {"id": f"s{index}", "image": f"images/{index}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the square ?"},
        {"from": "gpt", "value": f"the square is {colour}"}]}  # fmt: skip


def write_data(folder: Path) -> Path:
    """Five colour questions, a text-only sample, a second question on image 0 under the same id (as the world's
    captions and conversations share ids), a corrupt image (found at loading) and a missing one (found by the scan)."""
    (folder / "images").mkdir(parents=True)
    for index in range(5):
        colour = COLOURS[list(COLOURS)[index % len(COLOURS)]]
        Image.new("RGB", (40 + 6 * index, 32), colour).save(folder / "images" / f"{index}.png")
    (folder / "images" / "corrupt.png").write_bytes((folder / "images" / "0.png").read_bytes()[:60])
    records = [colour_record(0), {**colour_record(1), "id": "bad", "image": "images/corrupt.png"}, colour_record(1),
               {"id": "text", "conversations": [{"from": "human", "value": "is red a color ?"},
                                                {"from": "gpt", "value": "yes"}]},
               colour_record(2), colour_record(3), colour_record(4),
               {"id": "s0", "image": "images/0.png", "conversations": [
                   {"from": "human", "value": "<image>\nwhat shape is it ?"}, {"from": "gpt", "value": "a square"}]},
               {"id": "lost", "image": "images/missing.png", "conversations": [
                   {"from": "human", "value": "<image>\nwhat shape ?"}, {"from": "gpt", "value": "a circle"}]}]  # fmt: skip
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data):
    # A byte-level BPE on the file's text, so every reply tokenises back to exactly its text.
    texts = [turn["value"] for record in json.loads(data.read_text()) for turn in record["conversations"]]
    return train_world_tokenizer(texts * 3, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


def tiny_sharpened_model(tokenizer):
    torch.manual_seed(1)
    model, processor = build_model(tiny_clip(), tiny_llama(vocab_size=len(tokenizer)), tokenizer, "mlp2x_gelu")
    return sharpened(model.eval(), processor)


@pytest.fixture(scope="module")
def model_and_processor(tokenizer):
    return tiny_sharpened_model(tokenizer)


def dataset_for(processor, data: Path) -> LlavaDataset:
    return LlavaDataset(data, data.parent, processor)


def model_loss(model, collate, item: dict, pixel_values: torch.Tensor) -> tuple[float, int]:
    """(summed loss, supervised tokens) of one sample from the model's own mean loss, with the given image."""
    batch = collate([{**item, "pixel_values": pixel_values}])
    with torch.inference_mode():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"]).loss  # fmt: skip
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    return loss.item() * tokens, tokens


def test_losses_equal_the_models_own_loss_with_own_and_shifted_images(model_and_processor, data):
    model, processor = model_and_processor
    dataset, collate = dataset_for(processor, data), make_collator(processor)
    result = image_reliance(model, dataset, collate, batch_size=2)

    # Each readable image sample once: the corrupt record's stand-in (the next record) is not counted twice, the
    # second sample under id s0 is counted, the text-only and missing-image records are left out.
    items = [dataset.load(index) for index in IMAGE_RECORDS]
    own = [model_loss(model, collate, item, item["pixel_values"]) for item in items]
    other = [model_loss(model, collate, item, items[DONORS[i]]["pixel_values"]) for i, item in enumerate(items)]
    tokens = sum(n for _, n in own)
    assert result.samples == len(IMAGE_RECORDS) and result.supervised_tokens == tokens
    assert result.loss_own_images == pytest.approx(sum(s for s, _ in own) / tokens, rel=1e-5)
    assert result.loss_other_images == pytest.approx(sum(s for s, _ in other) / tokens, rel=1e-5)
    assert abs(result.gap) > 1e-3  # this random model's answers do depend on the image
    gaps = torch.tensor([o - s for (o, _), (s, _) in zip(other, own)], dtype=torch.float64)
    assert result.gap_standard_error == pytest.approx(float(gaps.std()) * len(gaps) ** 0.5 / tokens, rel=1e-4)
    assert result.to_dict()["gap"] == pytest.approx(result.loss_other_images - result.loss_own_images)


def test_a_model_blind_to_the_image_has_no_gap(data, tokenizer):
    model, processor = tiny_sharpened_model(tokenizer)
    with torch.no_grad():  # every image becomes the same (zero) embeddings
        model.projector.mlp[2].weight.zero_()
        model.projector.mlp[2].bias.zero_()
    result = image_reliance(model, dataset_for(processor, data), make_collator(processor), batch_size=4)
    assert result.loss_own_images > 0
    assert result.gap == pytest.approx(0.0, abs=1e-6)
    assert result.gap_standard_error == pytest.approx(0.0, abs=1e-6)


def test_other_images_gives_every_sample_another_image(model_and_processor, data):
    _, processor = model_and_processor
    swapped = OtherImages(dataset_for(processor, data), shift=2)
    n = len(IMAGE_RECORDS)
    own = [swapped.own(i)["pixel_values"] for i in range(len(swapped))]
    given = [swapped[i]["pixel_values"] for i in range(len(swapped))]
    assert len(given) == n
    assert all(torch.equal(given[i], own[(i + 2) % n]) for i in range(n))
    assert all(torch.equal(swapped[i]["input_ids"], swapped.own(i)["input_ids"]) for i in range(n))
    assert OtherImages(dataset_for(processor, data)).donors == DONORS
    with pytest.raises(ValueError, match="shift 6 is a multiple of the 6 image samples"):
        OtherImages(dataset_for(processor, data), shift=6)
    with pytest.raises(ValueError, match="every sample with images shows the same image"):
        OtherImages([swapped.own(0), swapped.own(5)])  # two questions on image 0 and nothing else
    with pytest.raises(ValueError, match="at least 2 samples with images, found 1"):
        OtherImages([swapped.own(0)])


def test_cli_prints_and_writes_the_result_and_reports_the_broken_record(model_and_processor, data, tmp_path, capsys):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "reliance.json"
    status = cli.main(["image-reliance", "--model", str(tmp_path / "model"), "--data", str(data), "--images",
                       str(data.parent), "--batch-size", "3", "--out", str(out)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr()
    written = json.loads(out.read_text())
    expected = image_reliance(model, dataset_for(processor, data), make_collator(processor))
    assert written["gap"] == pytest.approx(expected.gap, abs=1e-5)
    assert written["samples"] == len(IMAGE_RECORDS) and written["template"] == "vicuna_v1" and written["skipped"] == 2
    assert f"gap {expected.gap:.4f}" in printed.out
    for index, name in BROKEN.items():
        assert f"record {index}" in printed.err and name in printed.err
