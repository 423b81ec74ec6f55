"""The fast generation path (static KV cache, compiled decode steps) answers exactly as plain generate() does."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import StaticCache

from spatial_mllm.model import fast_generation_kwargs
from tiny import sharpened, tiny_model

TEXTS = ["<image> what color is the circle ?", "<image> what color is the circle ?", "<image> is there a red square left ?"]


def pictures() -> list[Image.Image]:
    out = []
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220), (20, 200, 20)]):
        image = Image.new("RGB", (48, 48), (245, 245, 245))
        image.paste(colour, (4 + 10 * i, 6, 24 + 10 * i, 30))
        out.append(image)
    return out


def batch(processor):
    # Rows 0 and 1 differ only by their image; row 2 is longer, so the others are left-padded.
    return processor(images=pictures(), text=TEXTS, padding_side="left")


@pytest.mark.parametrize("projector", ["llava_sp_pooling", "saep"])
def test_static_cache_gives_the_greedy_tokens_of_generate(projector):
    model, processor = sharpened(*tiny_model(projector))
    inputs = batch(processor)
    width = inputs["input_ids"].shape[1]
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)[:, width:]
    fast = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
        **fast_generation_kwargs("cpu", compile=False, max_cache_len=width + 40),
    )
    assert isinstance(fast.cache, StaticCache)
    assert fast.cache.layers[0].keys.shape[2] == width + 40  # (batch, heads, cache length, head width)
    assert fast.sequences[:, width:].tolist() == plain.tolist()
    # The images were read: the same question about two different pictures gets two different answers.
    assert plain[0].tolist() != plain[1].tolist()
    # A second call with another prompt length reuses the same cache size (what keeps a compiled step valid).
    short = processor(images=pictures()[:1], text=TEXTS[:1])
    again = model.generate(**short, max_new_tokens=12, do_sample=False, **fast_generation_kwargs("cpu", compile=False))
    alone = model.generate(**short, max_new_tokens=12, do_sample=False)
    assert again.tolist() == alone.tolist()


@pytest.mark.slow
def test_compiled_decode_steps_give_the_greedy_tokens_of_generate():
    torch._dynamo.reset()
    model, processor = sharpened(*tiny_model("llava_sp_cropping"))
    inputs = batch(processor)
    width = inputs["input_ids"].shape[1]
    plain = model.generate(**inputs, max_new_tokens=10, do_sample=False)[:, width:]
    kwargs = fast_generation_kwargs("cpu", compile=True, max_cache_len=width + 16)
    for _ in range(2):  # the second call runs the compiled step without compiling again
        fast = model.generate(**inputs, max_new_tokens=10, do_sample=False, **kwargs)[:, width:]
        assert fast.tolist() == plain.tolist()
    assert hasattr(model, "_compiled_call"), "the decode steps did not go through torch.compile"


def test_fast_generation_kwargs_compiles_on_gpus_and_when_asked():
    with pytest.raises(ValueError, match="max_cache_len must be a positive number of tokens, got 0"):
        fast_generation_kwargs("cpu", max_cache_len=0)
    on_gpu = fast_generation_kwargs("cuda")
    assert on_gpu["cache_implementation"] == "static" and on_gpu["compile_config"].mode == "reduce-overhead"
    assert on_gpu["compile_config"].dynamic is False  # one graph per batch size: the cache length is fixed
    # On CPU the static cache alone (measured faster there); compiled steps only when asked.
    assert fast_generation_kwargs("cpu") == {"cache_implementation": "static", "disable_compile": True}
    assert fast_generation_kwargs("cpu", compile=True)["compile_config"].mode == "default"
    assert fast_generation_kwargs("cuda", compile=False)["disable_compile"] is True
