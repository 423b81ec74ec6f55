"""What vLLM's Transformers modeling backend needs from a model folder, checked without vLLM (its wheel brings a
CUDA build of torch, so it cannot be installed beside ours). `vllm serve DIR --trust-remote-code` builds the model
with `AutoModel.from_config` through the folder's `auto_map`, swaps every attention call for its own through
transformers' attention interface, asks `get_image_features` for each image's embeddings, and asks the processor
how many tokens each image becomes and where each `<image>` was expanded. Each requirement below is checked on the
real folder, model and processor; `check_folder` returns them all, met or not, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..model.loading import load_for_inference

PROBE = "spatial_mllm_probe"  # an attention function registered under this name stands in for vLLM's


@dataclass(frozen=True)
class Requirement:
    name: str
    met: bool
    detail: str


def _composite_config(model) -> Requirement:
    config = model.config
    text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
    met = text is not None and vision is not None and config.get_text_config() is text and config is not text
    return Requirement("composite config", met,
                       "config has text_config and vision_config; get_text_config() is the LM's (vLLM's multimodal "
                       "test: hf_config != hf_text_config)" if met else "config is not text_config + vision_config")


def _auto_map(folder: Path) -> Requirement:
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    wanted = ("AutoConfig", "AutoModel", "AutoProcessor")
    missing = [name for name in wanted if name not in auto_map]
    modules = sorted({auto_map[name].split(".")[0] for name in wanted if name in auto_map})
    absent = [module for module in modules if not (folder / f"{module}.py").is_file()]
    if not missing and not absent:
        return Requirement("auto_map", True, f"config.json auto_map names {', '.join(wanted)} in {', '.join(modules)}.py")
    if not missing:
        return Requirement("auto_map", False, f"config.json auto_map names {', '.join(absent)}.py, which the folder lacks")
    return Requirement("auto_map", False, f"config.json auto_map lacks {', '.join(missing)}: a vLLM process, which "
                       "never imports spatial_mllm, cannot find the classes of model_type 'spatial_mllm'")


def _base_model(model) -> Requirement:
    """vLLM instantiates `AutoModel` (the base model, no LM head: it adds its own) and reads hidden states from it."""
    try:
        base = AutoModel.from_config(model.config)
    except ValueError as err:
        return Requirement("AutoModel base model", False,
                           f"AutoModel has no class for this config ({str(err).splitlines()[0][:120]}); vLLM needs a "
                           "base model (ViT + projector + the LM's decoder, no lm_head) with get_image_features, as "
                           "transformers' LlavaModel is to LlavaForConditionalGeneration")
    decoder = getattr(base, "language_model", None)
    met = decoder is not None and decoder.get_output_embeddings() is None and hasattr(base, "get_image_features")
    return Requirement("AutoModel base model", met, f"AutoModel gives {type(base).__name__}"
                       + ("" if met else ", whose language_model is not a bare decoder with get_image_features"))


def _attention_interface(model, processor) -> Requirement:
    """Every decoder layer must call attention through transformers' interface, so vLLM's can replace it."""
    calls = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE, probe)
    text_config = model.language_model.config
    before = text_config._attn_implementation
    inputs = processor(text=["USER: hello ASSISTANT:"], return_tensors="pt").to(model.device)
    try:
        text_config._attn_implementation = PROBE
        with torch.inference_mode():
            model(**inputs)
    finally:
        text_config._attn_implementation = before
    layers = text_config.num_hidden_layers
    met = len({id(m) for m in calls}) == layers and bool(getattr(model, "_supports_attention_backend", False))
    return Requirement("attention interface", met, f"{len({id(m) for m in calls})} of {layers} decoder layers called "
                       f"a registered attention function; _supports_attention_backend="
                       f"{getattr(model, '_supports_attention_backend', False)}")


def _image_features(model, processor) -> Requirement:
    pixel_values = processor.image_transform([Image.new("RGB", (50, 30), (200, 30, 30))] * 2).to(model.device)
    with torch.inference_mode():
        features = model.get_image_features(pixel_values.to(model.dtype))
    expected = (2, processor.num_image_tokens, model.config.text_config.hidden_size)
    met = isinstance(features, torch.Tensor) and tuple(features.shape) == expected
    shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
    return Requirement("get_image_features", met, f"2 images -> {shape}, expected {expected}")


def _token_counts(processor) -> Requirement:
    """`_get_num_multimodal_tokens` must agree with what the processor really writes into the prompt."""
    sizes = [(30, 50), (336, 336), (1000, 80)]
    try:
        counted = processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes])["num_image_tokens"]
    except (AttributeError, NotImplementedError) as err:
        return Requirement("image token count", False, f"the processor cannot count image tokens ({err})")
    real = []
    for height, width in sizes:
        ids = processor(images=[Image.new("RGB", (width, height))], text=["<image>\nx"])["input_ids"]
        real.append(int((ids == processor.image_token_id).sum()))
    return Requirement("image token count", counted == real,
                       f"counted {counted}, expanded {real} for images of {sizes} (height, width)")


def _replacement_offsets(processor) -> Requirement:
    """transformers >= 5.15: vLLM locates each image from the processor's text replacement offsets."""
    image = Image.new("RGB", (40, 40))
    text = "USER: <image>\nleft <image>\nright ASSISTANT:"
    out = processor(images=[image, image], text=[text], return_text_replacement_offsets=True,
                    return_mm_token_type_ids=True)
    offsets = (out.get("text_replacement_offsets") or [[]])[0]
    encoded = [processor.tokenizer(entry["replacement"], add_special_tokens=False)["input_ids"] for entry in offsets]
    each_right = len(offsets) == 2 and all(
        entry["type"] == "image" and text[slice(*entry["span"])] == processor.image_token for entry in offsets
    ) and all(ids == [processor.image_token_id] * processor.num_image_tokens for ids in encoded)
    marks = torch.as_tensor(out.get("mm_token_type_ids", torch.zeros(1))).flatten()
    marked = marks.numel() == out["input_ids"].numel() and torch.equal(
        marks.bool(), (out["input_ids"] == processor.image_token_id).flatten())
    return Requirement("text replacement offsets", each_right and marked,
                       f"{len(offsets)} replacement(s) for 2 images, each {processor.num_image_tokens} image tokens: "
                       f"{each_right}; mm_token_type_ids mark exactly the image tokens: {marked}")


def check_folder(folder: str | Path) -> list[Requirement]:
    """Every requirement, met or not; loads the folder's model on the CPU."""
    folder = Path(folder)
    model, processor = load_for_inference(folder)
    return [
        _composite_config(model),
        _auto_map(folder),
        _base_model(model),
        _attention_interface(model, processor),
        _image_features(model, processor),
        _token_counts(processor),
        _replacement_offsets(processor),
    ]


__all__ = ["Requirement", "check_folder"]
