"""Contrastive pretraining of a tiny CLIP on a world's images and object-list captions.

No pretrained weights can be downloaded for the built-in world, so its ViT is trained here the way CLIP was: a
symmetric image-text contrastive loss (`CLIPModel(return_loss=True)`), which makes the features global, as in real
CLIP. The saved folder is a full CLIP checkpoint plus its image processor, so `VisionTower.from_pretrained(folder)`
and `spatial_mllm.model.image_processor_for(folder)` load it like any hub CLIP.

The text tower ends every caption with its own end token (id = len(tokenizer)) and pools there: CLIP pools at the
configured eos id, and treats eos id 2 (that of the world tokenizer's </s>) as a legacy "pool at the highest id".
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerBase
from transformers.optimization import get_cosine_schedule_with_warmup

from ..cache import code_version, digest, images_digest, tokenizer_digest
from ..model.image_transform import ImageTransform
from .pretraining import PretrainResult, cached_pretraining, write_pretraining_record

ImageInput = Image.Image | str | os.PathLike


@dataclass(frozen=True)
class ClipPretrainConfig:
    """Model size and schedule. The vision tower sees image_size/patch_size patches per side (96/8 = 12)."""

    image_size: int = 96
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64
    steps: int = 350
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 25
    held_out: int = 200  # images kept out of training to measure retrieval
    seed: int = 0
    # bf16 autocast: no faster for towers this narrow on CPUs without AMX (measured), so off by default.
    mixed_precision: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_width", "text_width"):
            heads = self.vision_heads if name == "vision_width" else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name} {getattr(self, name)} is not divisible by its {heads} attention heads")
        for name in ("steps", "batch_size", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# The demo's two settings. Measured on one CPU thread: default on 2000 world images, 210 s, held-out image->text
# top-1 93% among 200 captions (chance 0.5%); quick on 300 images, 20 s, 63% among 60 (chance 1.7%).
CLIP_DEFAULT = ClipPretrainConfig()
CLIP_QUICK = ClipPretrainConfig(
    vision_width=64, vision_layers=3, steps=150, batch_size=32, lr=3e-3, warmup_steps=10, held_out=100
)


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing at this size (short side resize, centre crop, CLIP mean/std), as saved with the model."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _load_image(image: ImageInput, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {index} not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as err:
        raise ValueError(f"image {index} ({path}) cannot be read: {err}") from None


def preprocess_images(images: Sequence[ImageInput], image_processor: CLIPImageProcessorPil) -> torch.Tensor:
    """All images once into one (N, 3, S, S) tensor, prepared as the model's processor will (ImageTransform)."""
    transform = ImageTransform(image_processor)
    chunks = []
    for start in range(0, len(images), 256):
        chunks.append(transform([_load_image(img, start + i) for i, img in enumerate(images[start : start + 256])]))
    return torch.cat(chunks)


def encode_captions(captions: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (caption tokens, then the text tower's end id len(tokenizer), then padding) and attention_mask."""
    end_id = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for index, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption {index} is empty or not text: {caption!r}")
    encoded = [ids + [end_id] for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def build_clip_config(config: ClipPretrainConfig, vocab_size: int, max_text_tokens: int) -> CLIPConfig:
    """A CLIPConfig for `config`; the text vocabulary is the tokenizer's plus the end token."""
    end_id = vocab_size
    text = dict(
        vocab_size=vocab_size + 1,
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=max_text_tokens,
        eos_token_id=end_id,
        bos_token_id=end_id,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=config.vision_width,
        intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim)


@torch.inference_mode()
def image_to_text_retrieval(
    model: CLIPModel,
    pixel_values: torch.Tensor,
    captions: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    mixed_precision: bool = False,
) -> dict[str, float]:
    """Top-1 image->text retrieval over the distinct captions of these images; a hit is retrieving a caption equal to
    the image's own (identical object lists are indistinguishable). Also the chance level, 1 / distinct captions."""
    candidates = sorted(set(captions))
    input_ids, attention_mask = encode_captions(candidates, tokenizer)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
        text = _embeddings(
            model.get_text_features(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        )
        image = torch.cat(
            [_embeddings(model.get_image_features(pixel_values=chunk.to(device))) for chunk in pixel_values.split(256)]
        )
    best = (image @ text.T).argmax(dim=1).tolist()
    hits = sum(candidates[b] == caption for b, caption in zip(best, captions))
    return {
        "retrieval_top1": hits / len(captions),
        "retrieval_chance": 1 / len(candidates),
        "retrieval_images": float(len(captions)),
    }


def _embeddings(output) -> torch.Tensor:
    # get_*_features return the projected embedding (a tensor, or an output object holding it as pooler_output).
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


def _split(n: int, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    held_out = min(held_out, n // 5)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held_out:], order[:held_out]


def _batches(train_rows: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches, reshuffled every epoch; the last incomplete batch of an epoch is dropped."""
    generator = torch.Generator().manual_seed(seed + 1)
    while True:
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def pretrain_clip(
    images: Sequence[ImageInput],
    captions: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    config: ClipPretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    **options,
) -> PretrainResult:
    """Train a tiny CLIP on (image, caption) pairs and save it to out_dir.

    images: PIL images or paths; captions: one object-list caption per image. `options` override fields of
    `config` (default CLIP_DEFAULT), e.g. steps=100. Writes config.json + model.safetensors (CLIPModel),
    preprocessor_config.json and pretraining.json (config and metrics). Metrics: initial/final training loss,
    held-out image->text top-1 retrieval and its chance level, seconds.
    """
    config = dataclasses.replace(config or CLIP_DEFAULT, **options)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    if len(images) < 10:
        raise ValueError(f"CLIP pretraining needs at least 10 images (some are held out), got {len(images)}")
    started = time.perf_counter()
    device = torch.device(device)
    image_processor = clip_image_processor(config.image_size)
    pixel_values = preprocess_images(images, image_processor)
    input_ids, attention_mask = encode_captions(captions, tokenizer)
    preprocess_seconds = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(config.seed)
        model = CLIPModel(build_clip_config(config, len(tokenizer), input_ids.shape[1])).to(device)
    train_rows, eval_rows = _split(len(images), config.held_out, config.seed)
    batch_size = min(config.batch_size, len(train_rows))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    losses: list[float] = []
    model.train()
    for step, rows in zip(range(config.steps), _batches(train_rows, batch_size, config.seed)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision):
            loss = model(
                input_ids=input_ids[rows].to(device),
                attention_mask=attention_mask[rows].to(device),
                pixel_values=pixel_values[rows].to(device),
                return_loss=True,
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"clip step {step + 1}/{config.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("CLIP pretraining diverged (non-finite loss); lower lr")

    model.eval()
    window = max(1, min(10, len(losses) // 5))
    metrics = {
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "train_images": float(len(train_rows)),
        **image_to_text_retrieval(
            model, pixel_values[eval_rows], [captions[i] for i in eval_rows], tokenizer, config.mixed_precision
        ),
    }
    metrics["preprocess_seconds"] = preprocess_seconds
    metrics["seconds"] = time.perf_counter() - started
    out_dir = Path(out_dir)
    model.cpu().save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    write_pretraining_record(out_dir, dataclasses.asdict(config), metrics)
    if log is not None:
        log(
            f"clip: held-out image->text top-1 {metrics['retrieval_top1']:.1%} "
            f"(chance {metrics['retrieval_chance']:.1%}), {metrics['seconds']:.0f} s"
        )
    return PretrainResult(out_dir, metrics)


def pretrain_clip_cached(
    cache_dir: str | os.PathLike,
    images: Sequence[ImageInput],
    captions: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    config: ClipPretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    **options,
) -> PretrainResult:
    """`pretrain_clip` into `cache_dir/clip-<key>`, reusing that folder when the key matches.

    The key covers the config, the images (bytes), captions, tokenizer and this module's code, not the device.
    """
    config = dataclasses.replace(config or CLIP_DEFAULT, **options)
    data = (images_digest(images), list(captions), tokenizer_digest(tokenizer))
    key = digest(dataclasses.asdict(config), *data, code_version(__file__))
    result = cached_pretraining(
        cache_dir, "clip", key, lambda tmp: pretrain_clip(images, captions, tokenizer, tmp, config, log, device)
    )
    if result.reused and log is not None:
        log(f"clip: reusing {result.path} (held-out image->text top-1 {result.metrics['retrieval_top1']:.1%})")
    return result


__all__ = [
    "CLIP_DEFAULT",
    "CLIP_QUICK",
    "ClipPretrainConfig",
    "build_clip_config",
    "clip_image_processor",
    "encode_captions",
    "image_to_text_retrieval",
    "preprocess_images",
    "pretrain_clip",
    "pretrain_clip_cached",
]
