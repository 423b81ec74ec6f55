"""The model core end to end on tiny real transformers classes: loss, batched generation, save/load, conversions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from spatial_mllm.model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor, pad_to_square
from spatial_mllm.weights.hf_llava import export_hf_llava, import_hf_llava
from tiny import tiny_model

PAIRS = [("clip", "llama"), ("siglip", "qwen2")]


def images(n: int) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    out = []
    for i in range(n):
        image = Image.new("RGB", (40 + 8 * i, 48), (250, 250, 250))
        image.paste(colours[i % 4], (4 + i, 6, 20 + i, 22))
        out.append(image)
    return out


def batch(processor: SpatialMLLMProcessor, padding_side: str = "left"):
    processor.tokenizer.padding_side = padding_side
    texts = ["<image> what color is the circle ?", "what shape is left ?", "<image> is there a red square ?"]
    return processor(images=images(2), text=texts)


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_loss_masks_image_tokens_and_trains(vision, llm):
    model, processor = tiny_model(vision=vision, llm=llm)
    inputs = batch(processor, "right")
    n = model.num_image_tokens
    assert n == 144
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * n
    assert inputs["pixel_values"].shape == (2, 3, 48, 48)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    # Independent loss: next-token cross-entropy over text positions only (image and pad positions excluded).
    keep = labels.clone()
    keep[inputs["input_ids"] == model.config.image_token_id] = -100
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), keep[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters()), "vision tower is frozen by default"


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_batched_generation_equals_one_by_one(vision, llm):
    model, processor = tiny_model(vision=vision, llm=llm)
    inputs = batch(processor, "left")
    together = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    texts = ["<image> what color is the circle ?", "what shape is left ?", "<image> is there a red square ?"]
    pictures = [images(2)[0], None, images(2)[1]]
    for row, (text, picture) in enumerate(zip(texts, pictures)):
        single = processor(images=[picture] if picture else None, text=text)
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
        assert together[row].tolist() == alone.tolist()


def test_left_and_right_padding_give_the_same_logits_for_real_tokens():
    model, processor = tiny_model()
    left, right = batch(processor, "left"), batch(processor, "right")
    logits_left = model(**left).logits
    logits_right = model(**right).logits
    for row in range(3):
        real_left = logits_left[row][left["attention_mask"][row].bool()]
        real_right = logits_right[row][right["attention_mask"][row].bool()]
        torch.testing.assert_close(real_left, real_right, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_save_and_load_give_identical_logits(tmp_path, vision, llm):
    model, processor = tiny_model(vision=vision, llm=llm)
    inputs = batch(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SpatialMLLMForConditionalGeneration)
    assert isinstance(loaded_processor, SpatialMLLMProcessor)
    assert loaded_processor.num_image_tokens == model.num_image_tokens
    again = loaded_processor(images=images(2), text=["<image> what color is the circle ?", "what shape is left ?",
                                                      "<image> is there a red square ?"])
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(loaded(**again).logits, model(**inputs).logits)


def test_vision_features_replace_pixel_values():
    model, processor = tiny_model(projector="mlp2x_gelu")
    inputs = batch(processor)
    features = model.encode_vision(inputs["pixel_values"])
    assert [f.shape for f in features] == [torch.Size([2, 144, 32])]
    from_features = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], vision_features=features)
    torch.testing.assert_close(from_features.logits, model(**inputs).logits)


def test_mismatched_image_tokens_are_refused():
    model, processor = tiny_model()
    inputs = batch(processor)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=images(1), text="no placeholder here")


def test_pad_to_square_uses_the_mean_colour():
    model, processor = tiny_model()
    padded = pad_to_square(Image.new("RGB", (40, 20), (0, 0, 0)), processor.image_transform.fill)
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == (122, 116, 104)  # CLIP mean * 255, truncated as LLaVA's expand2square does
    assert padded.getpixel((20, 20)) == (0, 0, 0)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_export_to_hf_llava_gives_the_same_logits(tmp_path, vision):
    model, processor = tiny_model(vision=vision)
    inputs = batch(processor, "right")
    export_hf_llava(model, tmp_path, processor)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    theirs = llava(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(theirs, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    back = import_hf_llava(tmp_path)
    assert torch.equal(back(**inputs).logits, model(**inputs).logits)


def test_export_refuses_other_projectors(tmp_path):
    from spatial_mllm.weights.hf_llava import to_hf_llava

    model, _ = tiny_model(projector="linear")
    with pytest.raises(ValueError, match="only mlp2x_gelu"):
        to_hf_llava(model)
