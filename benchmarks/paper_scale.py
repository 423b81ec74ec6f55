"""Inference and training at the papers' scale: CLIP ViT-L/14-336 into a Vicuna-7B-shaped Llama, random init.

Models are built from configs (no download; the weights' values do not change the time), one per projector, in the
chosen dtype (bf16 by default) on the chosen device. In one run, per projector:

- projector: the projector alone, forward ms per image at batch 1 and 8;
- inference: through `generate()` (greedy, exactly `new_tokens` new tokens, `<image>` suppressed), at batch 1 and
  8, timed by a streamer that notes when each token reaches the host: the time to the first token ("prefill": ViT
  + projector + LLM over the prompt) and the decode step's time (the median step of a call), given as tokens/s
  summed over the batch. For mlp2x_gelu, transformers' `LlavaForConditionalGeneration` on the same weights
  (`to_hf_llava`) runs the same prompts, interleaved;
- fast: mlp2x_gelu only: ours and Llava as above, both also with a static KV cache and compiled decode steps, and
  ours with the static cache alone (`spatial_mllm.model.fast_generation_kwargs`), interleaved, with their greedy
  tokens compared and (on CPU) the model's own forward time per decode step beside the step's; ratios against
  Llava's default generate (a dynamic cache), which is what users would otherwise run;
- train: one optimiser step of the LLaVA-1.5 recipe's stage 1 (projector) and stage 2 (LoRA r=128, and full), built
  by the training engine's own pieces (the shipped recipe configs, `configure_for_stage`, `make_optimizer`,
  `accumulate_gradients`), gradient checkpointing and bf16 autocast: samples/s and, on CUDA, peak memory.

Times are medians of `reps` interleaved repetitions after a warm-up, with their spread, (max - min) / median (every
raw time is in the JSON); the first call of each variant (compilation included, where there is one) is reported
apart. Prints the tables and writes JSON after each projector, so an interrupted run keeps what it measured.

    python benchmarks/paper_scale.py [--small | --size medium] [--device cuda] [--dtype bfloat16]
        [--out runs/bench/paper_scale.json] [--projectors ...] [--parts projector inference fast train] [--no-compile]
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.generation.streamers import BaseStreamer

from spatial_mllm.files import write_json
from spatial_mllm.model import SpatialMLLMConfig, SpatialMLLMForConditionalGeneration, fast_generation_kwargs
from spatial_mllm.projectors import PROJECTORS
from spatial_mllm.training.config import load_config
from spatial_mllm.training.engine import accumulate_gradients, configure_for_stage, make_accelerator, make_optimizer
from spatial_mllm.weights.hf_llava import to_hf_llava

BASELINE = "mlp2x_gelu"
PAPER_PROJECTORS = (BASELINE, "llava_sp_pooling", "llava_sp_cropping", "saep", "ldpv2", "c_abstractor", "tokenpacker")
PARTS = ("projector", "inference", "fast", "train")
BATCHES = (1, 8)
# Stage and recipe of each training mode: the shipped LLaVA-1.5 configs, with these overrides.
TRAIN_MODES = {
    "stage1": ("llava15_stage1", []),
    "stage2_lora": ("llava15_stage2", ["lora.enabled=true"]),
    "stage2_full": ("llava15_stage2", ["lora.enabled=false"]),
}
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class Size:
    """Model shapes and workload of one benchmark size."""

    vision: dict  # CLIPVisionConfig arguments
    llm: dict  # LlamaConfig arguments
    image_token_id: int  # inside the LLM's vocabulary, as llava-hf has it (LlavaForConditionalGeneration needs it)
    text_before: int  # prompt tokens before the image (BOS, system prompt, "USER:")
    text_after: int  # after it (the question, "ASSISTANT:")
    new_tokens: int
    train_text_tokens: int  # text tokens of a training sample besides the image (all supervised)
    train_batch: int
    reps: int
    projector_options: dict = field(default_factory=dict)  # per projector name


def _llava_sp_half_width(vision_width: int) -> dict:
    # LLaVA-SP's SFE tokens are half the ViT width at paper scale (1024 -> 512): kept for narrower towers.
    half = {"spatial_width": vision_width // 2}
    return {name: half for name in ("llava_sp_pooling", "llava_sp_cropping", "llava_sp_pooling_nodfi")}


def _llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, kv_heads: int | None = None) -> dict:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


SIZES = {
    # CLIP ViT-L/14-336 (24x24 patches) and Vicuna-7B v1.5 (vocabulary 32000 + <image>, padded to 32064 as llava-hf).
    "paper": Size(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        llm=_llama(4096, 32, 32, 11008, 32064),
        image_token_id=32000, text_before=36, text_after=20, new_tokens=32, train_text_tokens=128, train_batch=8,
        reps=3,
    ),
    # A small VLM for CPUs: SmolLM2-135M's LLM shape (30 layers of 576) behind a 12x12-patch ViT.
    "medium": Size(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=192, patch_size=16),
        llm=_llama(576, 30, 9, 1536, 49216, kv_heads=3),
        image_token_id=49152, text_before=36, text_after=20, new_tokens=16, train_text_tokens=64, train_batch=4,
        reps=3, projector_options=_llava_sp_half_width(384),
    ),
    # The demo's scale (8x8-patch ViT, 3-layer 192-wide LLM): CPU decode bound by per-step overhead. Also the test's.
    "small": Size(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    image_size=96, patch_size=12),
        llm=_llama(192, 3, 4, 512, 2112, kv_heads=2),
        image_token_id=2048, text_before=36, text_after=20, new_tokens=32, train_text_tokens=32, train_batch=4,
        reps=5, projector_options=_llava_sp_half_width(64),
    ),
}


# --- building ----------------------------------------------------------------------------------------------------------


def build(size: Size, projector: str, device: torch.device, dtype: torch.dtype) -> SpatialMLLMForConditionalGeneration:
    """A random-init model of `size` with `projector`, made directly on `device` in `dtype`."""
    torch.manual_seed(0)
    config = SpatialMLLMConfig(
        vision_config=CLIPVisionConfig(**size.vision).to_dict(),
        text_config=LlamaConfig(**size.llm).to_dict(),
        projector_type=projector,
        projector_options=size.projector_options.get(projector, {}),
        image_token_id=size.image_token_id,
        pad_token_id=PAD,
    )
    with torch.device(device):
        model = SpatialMLLMForConditionalGeneration._from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def prompts(size: Size, num_image_tokens: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """`batch` different prompts (random text ids around one image's tokens) with their images."""
    generator = torch.Generator().manual_seed(batch)

    def text(n: int) -> torch.Tensor:  # ids above the special tokens, below <image>
        return torch.randint(3, size.image_token_id, (batch, n), generator=generator)

    input_ids = torch.cat(
        [
            torch.full((batch, 1), BOS),
            text(size.text_before - 1),
            torch.full((batch, num_image_tokens), size.image_token_id),
            text(size.text_after),
        ],
        dim=1,
    )
    side = size.vision["image_size"]
    pixel_values = torch.randn(batch, 3, side, side, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


# --- the projector alone -----------------------------------------------------------------------------------------------


def projector_ms_per_image(model, size: Size, device: torch.device, dtype: torch.dtype) -> dict:
    result = {}
    for batch in BATCHES:
        pixels = prompts(size, model.num_image_tokens, batch, device, dtype)["pixel_values"]
        with torch.inference_mode():
            features = model.encode_vision(pixels)
            model.projector(features)  # warm-up
            times = [timed(device, lambda: model.projector(features))[0] for _ in range(size.reps)]
        result[str(batch)] = 1000 * statistics.median(times) / batch
    return result


# --- generation --------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of generating: a model and the extra generate() arguments."""

    name: str
    model: torch.nn.Module
    kwargs: dict


class TokenClock(BaseStreamer):
    """A streamer that notes when each generate() output arrives on the host: first the prompt (at the call's start),
    then each new token (generate() hands it over as soon as it is computed, once per step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Call:
    """One timed generate(): the new tokens, the time to the first new token, each decode step's time and (when
    asked) the model's own forward time in each decode step."""

    tokens: torch.Tensor
    total_s: float
    prefill_s: float
    step_s: list[float]
    forward_s: list[float]


def generate(variant: Variant, inputs: dict, new_tokens: int, image_token_id: int, device,
             time_forward: bool = False) -> Call:
    clock = TokenClock()
    with forward_timer(variant, device, enabled=time_forward) as forward_s:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            output = variant.model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                suppress_tokens=[image_token_id], pad_token_id=PAD, streamer=clock, **variant.kwargs,
            )
        sync(device)
        total = time.perf_counter() - start
    arrivals = clock.times[1:]  # the first put is the prompt
    return Call(
        tokens=output[:, inputs["input_ids"].shape[1]:],
        total_s=total,
        prefill_s=arrivals[0] - start,
        step_s=[later - earlier for earlier, later in zip(arrivals, arrivals[1:])],
        forward_s=forward_s,
    )


@contextmanager
def forward_timer(variant: Variant, device, enabled: bool):
    """Yields a list that receives the time of each decode step's model call while the block runs: the eager
    forward, or the compiled call transformers makes for a static cache (`_compiled_call`, made by the first call)."""
    times: list[float] = []
    if not enabled:
        yield times
        return
    model = variant.model
    name = "_compiled_call" if "compile_config" in variant.kwargs and hasattr(model, "_compiled_call") else "forward"
    original = getattr(model, name)

    @functools.wraps(original)  # generate() checks its arguments against the forward's signature
    def timed_call(*args, **kwargs):
        seconds, output = timed(device, lambda: original(*args, **kwargs))
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if ids is not None and ids.shape[1] == 1:  # a decode step, not the prefill
            times.append(seconds)
        return output

    setattr(model, name, timed_call)
    try:
        yield times
    finally:
        if name == "forward":
            del model.forward  # back to the class's method
        else:
            model._compiled_call = original


def measure_generation(
    variants: list[Variant], size: Size, image_tokens: int, batch: int, device, dtype, breakdown: bool = False
) -> dict:
    """Per variant: the first call's time (compilation included where there is one), the greedy tokens' agreement
    with the first variant, and `reps` timed calls, interleaved across variants; then the speed-ups of each variant
    against the first. `breakdown`: also the model's own forward time per decode step, in one more call (the rest
    of a step is generate()'s own work)."""
    n = size.new_tokens
    inputs = prompts(size, image_tokens, batch, device, dtype)
    runs, tokens = {}, {}
    for variant in variants:
        first = generate(variant, inputs, n, size.image_token_id, device)
        tokens[variant.name] = first.tokens
        runs[variant.name] = {"first_call_s": first.total_s, "calls": []}
    reference = variants[0].name
    for variant in variants[1:]:
        same = tokens[variant.name] == tokens[reference]
        runs[variant.name]["same_greedy_tokens"] = bool(same.all())
        runs[variant.name]["token_agreement"] = float(same.float().mean())
    time_forward = breakdown and device.type == "cpu"  # on a GPU the timer's synchronisation would slow the steps
    for _ in range(size.reps):
        for variant in variants:
            runs[variant.name]["calls"].append(generate(variant, inputs, n, size.image_token_id, device, time_forward))
    for run in runs.values():
        run.update(rates(run.pop("calls"), batch, n))
    base = runs[reference]
    speedups = {
        name: {
            "prefill": base["prefill_s"] / run["prefill_s"],
            "decode": run["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        }
        for name, run in runs.items() if name != reference
    }
    return {"runs": runs, "reference": reference, "speedup_vs_reference": speedups}


def rates(calls: list[Call], batch: int, new_tokens: int) -> dict:
    """Medians over the calls: the time to the first token ("prefill"), the decode step's time (each call's median
    step, so a step disturbed by other work on the machine does not count) and the tokens/s they give, summed over
    the batch; spreads are (max - min) / median over the calls. Raw times are kept."""
    prefill = [call.prefill_s for call in calls]
    step = [statistics.median(call.step_s) for call in calls]
    total = [call.total_s for call in calls]
    forward = [statistics.median(call.forward_s) for call in calls if call.forward_s]
    breakdown = {
        "decode_forward_ms": 1000 * statistics.median(forward),
        "decode_forward_share": statistics.median(f / s for f, s in zip(forward, step)),
    } if forward else {}
    return {
        "prefill_s": statistics.median(prefill),
        "prefill_spread": _spread(prefill),
        "decode_step_ms": 1000 * statistics.median(step),
        "decode_tokens_per_s": batch / statistics.median(step),
        "decode_spread": _spread(step),
        "end_to_end_tokens_per_s": batch * new_tokens / statistics.median(total),
        "prefill_times_s": prefill,
        "decode_step_times_s": [call.step_s for call in calls],
        "generate_times_s": total,
        **breakdown,
    }


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def inference(model, size: Size, device, dtype, with_llava: bool) -> dict:
    """Ours (and transformers' Llava on the same weights) through the default generate(), at each batch size."""
    variants = [Variant("ours", model, {})]
    if with_llava:
        with torch.device(device):
            variants.insert(0, Variant("hf_llava", to_hf_llava(model), {}))
    result = {str(b): measure_generation(variants, size, model.num_image_tokens, b, device, dtype) for b in BATCHES}
    result["attn_implementation"] = {v.name: v.model.config.get_text_config()._attn_implementation for v in variants}
    return result


def fast_comparison(model, size: Size, device, dtype, compile: bool, llava_compiled: bool, result: dict,
                    save) -> dict:
    """transformers' Llava and ours, each through the default generate() and with a static cache and compiled decode
    steps (eager steps if not `compile`), and ours with the static cache alone, on the same prompts;
    llava_compiled=False leaves out Llava's compiled runtime (saving its compilation). Fills `result` and calls
    `save()` after each batch size, so that a run stopped during a compilation keeps what was measured."""
    with torch.device(device):
        llava = to_hf_llava(model)
    prompt_len = size.text_before + model.num_image_tokens + size.text_after
    compiled = fast_generation_kwargs(device, compile=compile, max_cache_len=prompt_len + size.new_tokens)
    static = fast_generation_kwargs(device, compile=False, max_cache_len=prompt_len + size.new_tokens)
    variants = [
        Variant("hf_llava", llava, {}),
        *([Variant("hf_llava_compiled", llava, compiled)] if llava_compiled else []),
        Variant("ours", model, {}),
        Variant("ours_static", model, static),  # the static cache alone, to tell its effect from compilation's
        Variant("ours_compiled", model, compiled),
    ]
    result["compiled"] = compile
    result["weight_read_floor_ms"] = weight_read_floor_ms(model, size, device, dtype)
    for batch in BATCHES:
        result[str(batch)] = measure_generation(
            variants, size, model.num_image_tokens, batch, device, dtype, breakdown=True
        )
        save()
    return result


def weight_read_floor_ms(model, size: Size, device, dtype) -> float:
    """Time of one linear layer as large as all the LLM's matrices together (output head included, token embeddings
    not: a step reads one row of those), on one token: what reading the weights once costs on this machine, the part
    of a batch-1 decode step that no runtime can remove."""
    matrices = model.language_model.named_parameters()
    count = sum(p.numel() for n, p in matrices if p.dim() == 2 and "embed_tokens" not in n)
    columns = size.llm["hidden_size"]
    weight = torch.randn(count // columns, columns, dtype=dtype, device=device)
    token = torch.randn(1, columns, dtype=dtype, device=device)
    with torch.inference_mode():
        torch.nn.functional.linear(token, weight)  # warm-up
        times = [timed(device, lambda: torch.nn.functional.linear(token, weight))[0] for _ in range(max(3, size.reps))]
    return 1000 * statistics.median(times)


# --- training ----------------------------------------------------------------------------------------------------------


def train_batch(size: Size, num_image_tokens: int, dtype) -> dict:
    """One micro-batch as the engine's collator gives it (the engine moves it to the device): the image first, all
    text supervised."""
    generator = torch.Generator().manual_seed(0)
    batch = size.train_batch
    text = torch.randint(3, size.image_token_id, (batch, size.train_text_tokens), generator=generator)
    image = torch.full((batch, num_image_tokens), size.image_token_id)
    input_ids = torch.cat([torch.full((batch, 1), BOS), image, text], 1)
    labels = input_ids.clone()
    labels[:, : 1 + num_image_tokens] = -100
    side = size.vision["image_size"]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, side, side, generator=generator).to(dtype),
    }


def train_step(size: Size, projector: str, mode: str, device, dtype, steps: int) -> dict:
    """samples/s of the recipe's optimiser step (first step excluded: allocation and kernel selection), peak memory."""
    recipe, overrides = TRAIN_MODES[mode]
    mixed = "bf16" if dtype == torch.bfloat16 else "no"
    config = load_config(recipe, [
        *overrides,
        f"model.projector={projector}",
        f"optimisation.micro_batch_size={size.train_batch}",
        f"optimisation.global_batch_size={size.train_batch}",
        f"optimisation.mixed_precision={mixed}",
        "optimisation.gradient_checkpointing=true",
    ])
    model = build(size, projector, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    accelerator = make_accelerator(config)
    configure_for_stage(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, scheduler = make_optimizer(model, config, total_steps=steps + 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    accelerator.unwrap_model(model).vision_tower.train(False)
    batch = train_batch(size, accelerator.unwrap_model(model).num_image_tokens, dtype)
    batches = iter(lambda: batch, None)  # the same micro-batch every step
    times, losses = [], []

    def step() -> float:
        loss, _ = accumulate_gradients(accelerator, model, batches, config)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for index in range(steps + 1):
        seconds, loss = timed(device, step)
        losses.append(loss)
        if index:
            times.append(seconds)
    result = {
        "samples_per_s": size.train_batch / statistics.median(times),
        "step_s": times,
        "trainable_params": trainable,
        "loss": losses,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    del model, optimizer, scheduler, accelerator
    free(device)
    return result


def training(size: Size, projector: str, device, dtype, steps: int) -> dict:
    results = {}
    for mode in TRAIN_MODES:
        try:
            results[mode] = train_step(size, projector, mode, device, dtype, steps)
        except torch.OutOfMemoryError as err:  # full fine-tuning of 7B on one GPU may not fit: a result, not a crash
            results[mode] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        free(device)  # after the except block, which holds the failed step's tensors through the traceback
    return results


# --- tables ------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _rate(run: dict) -> str:
    """Decode tokens/s with its spread (half the range over the repetitions, relative)."""
    if run.get("decode_tokens_per_s") is None:
        return "-"
    return f"{run['decode_tokens_per_s']:.1f} ±{50 * run['decode_spread']:.0f}%"


def inference_table(results: dict) -> str:
    rows = [
        "| projector | tokens | projector ms/img b1 | prefill s b1 | decode tok/s b1 | prefill s b8 | decode tok/s b8 "
        f"| decode b1 vs {BASELINE} | prefill b8 vs {BASELINE} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def ours(name: str, batch: str) -> dict:
        return results.get(name, {}).get("inference", {}).get(batch, {}).get("runs", {}).get("ours", {})

    for name, r in results.items():
        b1, b8 = ours(name, "1"), ours(name, "8")
        decode_ratio = _ratio(b1.get("decode_tokens_per_s"), ours(BASELINE, "1").get("decode_tokens_per_s"))
        prefill_ratio = _ratio(b8.get("prefill_s"), ours(BASELINE, "8").get("prefill_s"))
        rows.append(
            f"| {name} | {r['tokens']} | {_fmt(r.get('projector_ms_per_image', {}).get('1'), '.2f')} "
            f"| {_fmt(b1.get('prefill_s'), '.3f')} | {_rate(b1)} | {_fmt(b8.get('prefill_s'), '.3f')} | {_rate(b8)} "
            f"| {_fmt(decode_ratio, '.3f')} | {_fmt(prefill_ratio, '.3f')} |"
        )
    return "\n".join(rows)


def speed_table(by_batch: dict) -> str:
    """Each runtime against the reference (transformers' Llava, default generate) at batch 1 and 8."""
    rows = [
        "| batch | runtime | prefill s | decode tok/s | prefill speed-up | decode speed-up | decode step ms "
        "| of which forward | first call s | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in map(str, BATCHES):
        measured = by_batch.get(batch)
        if not measured:
            continue
        for name, run in measured["runs"].items():
            speedup = measured["speedup_vs_reference"].get(name, {"prefill": 1.0, "decode": 1.0})
            same = run.get("same_greedy_tokens")
            agreement = "-" if same is None else ("yes" if same else f"{run['token_agreement']:.0%} of tokens")
            rows.append(
                f"| {batch} | {name} | {run['prefill_s']:.4f} | {_rate(run)} "
                f"| {_fmt(speedup['prefill'], '.2f')}x | {_fmt(speedup['decode'], '.2f')}x "
                f"| {_fmt(run.get('decode_step_ms'), '.2f')} | {_fmt(run.get('decode_forward_ms'), '.2f')} "
                f"| {run['first_call_s']:.1f} | {agreement} |"
            )
    return "\n".join(rows)


def train_table(results: dict) -> str:
    rows = ["| projector | mode | samples/s | peak GiB | trainable params (M) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for mode, t in r.get("train", {}).items():
            if "error" in t:
                rows.append(f"| {name} | {mode} | {t['error']} | | |")
            else:
                rows.append(
                    f"| {name} | {mode} | {t['samples_per_s']:.2f} | {_fmt(t['peak_memory_gib'], '.1f')} "
                    f"| {t['trainable_params'] / 1e6:.1f} |"
                )
    return "\n".join(rows)


# --- the run -----------------------------------------------------------------------------------------------------------


def run(size_name: str, projectors: list[str], parts: list[str], device: torch.device, dtype: torch.dtype,
        out: Path, compile: bool = True, train_steps: int = 2, reps: int | None = None,
        llava_compiled: bool = True) -> dict:
    size = SIZES[size_name] if reps is None else replace(SIZES[size_name], reps=reps)
    report: dict = {
        "settings": {
            "size": size_name, "shapes": asdict(size), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "parts": parts, "batches": list(BATCHES), "compile": compile, "llava_compiled": llava_compiled,
            "train_steps_timed": train_steps,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "projectors": {},
    }
    for name in projectors:
        entry: dict = report["projectors"].setdefault(name, {})
        if {"projector", "inference", "fast"} & set(parts):
            model = build(size, name, device, dtype)
            entry["tokens"] = model.num_image_tokens
            entry["projector_params"] = sum(p.numel() for p in model.projector.parameters())
            if "projector" in parts:
                entry["projector_ms_per_image"] = _logged(
                    name, "projector", projector_ms_per_image, model, size, device, dtype
                )
            if "inference" in parts:
                entry["inference"] = _logged(name, "inference", inference, model, size, device, dtype, name == BASELINE)
            if "fast" in parts and name == BASELINE:
                report["fast"] = {}
                _logged(name, "fast", fast_comparison, model, size, device, dtype, compile, llava_compiled,
                        report["fast"], lambda: write_json(out, with_tables(report)))
            del model
            free(device)
            write_json(out, with_tables(report))
        if "train" in parts:
            entry["train"] = _logged(name, "train", training, size, name, device, dtype, train_steps)
            entry.setdefault("tokens", _tokens(size, name))
            write_json(out, with_tables(report))
    return with_tables(report)


def _logged(name: str, part: str, fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    print(f"{name} {part}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return result


def _tokens(size: Size, projector: str) -> int:
    return build(size, projector, torch.device("meta"), torch.float32).num_image_tokens  # no memory, no time


def with_tables(report: dict) -> dict:
    tables = {}
    results = report["projectors"]
    if any("inference" in r or "projector_ms_per_image" in r for r in results.values()):
        tables["inference"] = inference_table(results)
    baseline = results.get(BASELINE, {}).get("inference")
    if baseline and "hf_llava" in baseline["1"]["runs"]:
        tables["parity"] = speed_table(baseline)
    if "fast" in report:
        floor = report["fast"]["weight_read_floor_ms"]
        tables["fast"] = speed_table(report["fast"]) + (
            f"\n\nReading the LLM's weights once (one linear layer as large, on one token) takes {floor:.2f} ms here: "
            "the part of a batch-1 decode step no runtime removes."
        )
    if any("train" in r for r in results.values()):
        tables["train"] = train_table(results)
    return {**report, "tables": tables}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="paper", help="model shapes (default: paper)")
    parser.add_argument("--small", action="store_true", help="same as --size small: tiny models, seconds on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/paper_scale.json"), help="JSON results file")
    parser.add_argument("--projectors", nargs="+", default=list(PAPER_PROJECTORS), metavar="NAME")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure")
    parser.add_argument("--no-compile", action="store_true", help="the compiled runtimes with eager steps (no waiting)")
    parser.add_argument("--no-llava-compiled", action="store_true", help="leave out Llava compiled (one compilation)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed optimiser steps per mode (after one warm-up)")
    parser.add_argument("--reps", type=int, help="timed repetitions of each measurement (default: the size's)")
    args = parser.parse_args()

    unknown = sorted(set(args.projectors) - set(PROJECTORS.names()))
    if unknown:
        parser.error(f"--projectors: unknown {unknown}; registered: {', '.join(PROJECTORS.names())}")
    if "fast" in args.parts and BASELINE not in args.projectors:
        parser.error(f"--parts fast compares {BASELINE} with transformers' Llava: include it in --projectors")
    if args.train_steps < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--train-steps and --reps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # The baseline first: one-time warm-up of the libraries should not land on the projectors compared with it.
    projectors = sorted(set(args.projectors), key=lambda n: (n != BASELINE, args.projectors.index(n)))
    report = run("small" if args.small else args.size, projectors, args.parts, device, getattr(torch, args.dtype),
                 args.out, compile=not args.no_compile, train_steps=args.train_steps, reps=args.reps,
                 llava_compiled=not args.no_llava_compiled)
    for title, table in report["tables"].items():
        print(f"\n## {title}\n\n{table}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
