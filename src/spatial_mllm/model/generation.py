"""Faster generation through transformers' own machinery: a static KV cache and compiled decode steps.

`model.generate(**inputs, **fast_generation_kwargs(model.device))` keeps the KV cache in preallocated tensors
(transformers' `StaticCache`) and runs every decode step through `torch.compile` (CUDA graphs on GPU, transformers'
default "reduce-overhead" mode; inductor's fused C++ kernels on CPU). The prefill, where the projector's image
features are merged into the prompt, runs eagerly as usual; after it the images live in the cache and each decode
step is the language model alone, which compiles as one graph (SpatialMLLMForConditionalGeneration sets
`_can_compile_fullgraph`). Greedy outputs equal those of plain `generate()`.

The first call pays the compilation (tens of seconds; once per batch size and cache length), later calls reuse it:
pass `max_cache_len` at least as long as the longest prompt plus new tokens expected, so that prompts of other
lengths reuse the same compiled step. docs/performance.md has the measured gains.
"""

from __future__ import annotations

import torch
from transformers import CompileConfig


def fast_generation_kwargs(
    device: torch.device | str, compile: bool = True, max_cache_len: int | None = None
) -> dict:
    """Keyword arguments for `generate()`: a static KV cache, and (compile=True) compiled decode steps on any device.

    compile=False keeps the static cache with eager steps (no compilation wait; no speed gain on its own).
    """
    kwargs: dict = {"cache_implementation": "static"}
    if max_cache_len is not None:
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive number of tokens, got {max_cache_len}")
        kwargs["max_cache_len"] = max_cache_len
    if not compile:
        kwargs["disable_compile"] = True
        return kwargs
    on_gpu = torch.device(device).type == "cuda"
    # CUDA graphs remove the per-step launch overhead on GPU; on CPU they do not exist, inductor's default mode fuses.
    config = CompileConfig(mode="reduce-overhead" if on_gpu else "default", dynamic=False)
    # transformers compiles by itself on CUDA/XPU only; this (documented) flag asks for it on CPU too.
    config._compile_all_devices = True
    kwargs["compile_config"] = config
    return kwargs


__all__ = ["fast_generation_kwargs"]
