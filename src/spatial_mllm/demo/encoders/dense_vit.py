"""Dense pretraining of the built-in world's ViT: every patch learns to say what lies under it.

A contrastive CLIP trained on object lists learns global colour statistics, not local shape (measured: the patch
under an object's centre gives its shape no better than a random-init ViT, ~37%). Here every patch is asked, by
small heads on several hidden states, for the colour, shape and size of the object covering it (or background)
and for that object's centre: the per-patch, location-aware supervision that SigLIP 2's dense objectives and
LocCa's grounded captions give real towers, read straight off the scene graph. The heads are dropped after
training; the saved folder is a plain `CLIPVisionModel` plus its image processor, so `VisionTower.from_pretrained`
and `AutoImageProcessor.from_pretrained` load it like any hub CLIP.

Scenes come from a pretraining world (its own seed, train split only): no test or hold-out scene, and no held-out
combination, is ever seen.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from ..world.render import render_scene
from ..world.scene import Scene, WorldConfig, derive_seed, generate_scene
from ...model.image_transform import normalise_pixels
from ..pretraining import PretrainResult, Schedule, loss_summary, optimise, save_pretrained_folder
from .patch_labels import ATTRIBUTES, DenseTargets, dense_targets

CLASSES = {name: len(values) + 1 for name, values in ATTRIBUTES.items()}  # + background


@dataclass(frozen=True)
class VitPretrainConfig:
    """The tower, the pretraining world and the schedule. Hidden-state indices count the embeddings as 0."""

    canvas: int = 96
    patch_size: int = 12
    width: int = 96
    layers: int = 4
    heads: int = 4
    head_layers: tuple[int, ...] = (2, 3, 4)  # hidden states with a dense head (projectors read 2 and 3)
    centre_weight: float = 10.0  # of the centre regression against the three classification losses
    min_cover: float = 0.15  # share of a patch an object must cover to own it
    world_seed: int = 1000  # the pretraining world, distinct from the demo's worlds
    scenes: int = 8000
    held_out: int = 400  # further pretraining-world scenes, for the held-out metrics
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canvas % self.patch_size:
            raise ValueError(f"canvas {self.canvas} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by its {self.heads} attention heads")
        for name in ("steps", "batch_size", "scenes", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.head_layers or not all(0 < layer <= self.layers for layer in self.head_layers):
            raise ValueError(f"head_layers {self.head_layers} must be hidden-state indices in 1..{self.layers}")

    @property
    def grid(self) -> int:
        return self.canvas // self.patch_size


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing at this size (short side resize, centre crop, CLIP mean/std), as saved with the model."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def pretraining_scenes(config: VitPretrainConfig, count: int, offset: int = 0) -> list[Scene]:
    """Scenes `offset`..`offset+count` of the pretraining world's train split (the demo world's generator)."""
    world = WorldConfig(canvas=config.canvas)
    return [
        generate_scene(world, random.Random(derive_seed(config.world_seed, "scene", "train", i)), f"train_{i:06d}",
                       "train", derive_seed(config.world_seed, "noise", "train", i))
        for i in range(offset, offset + count)
    ]  # fmt: skip


def render_pixels(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, H, W) uint8: the rendered scenes, kept as bytes until a batch is normalised."""
    return torch.from_numpy(np.stack([np.asarray(render_scene(scene)) for scene in scenes])).permute(0, 3, 1, 2)


class DenseHeads(nn.Module):
    """Per hidden state: LayerNorm then one Linear giving colour, shape and size logits and the centre (x, y)."""

    def __init__(self, width: int, head_layers: tuple[int, ...]):
        super().__init__()
        self.head_layers = head_layers
        outputs = sum(CLASSES.values()) + 2
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, outputs)) for _ in head_layers)

    def losses(self, hidden_states: tuple[torch.Tensor, ...], targets: DenseTargets, centre_weight: float):
        """Sum over heads of the three cross-entropies + centre_weight * smooth-L1 on object patches; and a dict of
        the mean per-term losses for logging."""
        total, parts = 0.0, {name: 0.0 for name in (*CLASSES, "centre")}
        on_object = targets.color > 0
        centre = torch.stack([targets.centre_x, targets.centre_y], -1)[on_object]
        for layer, head in zip(self.head_layers, self.heads):
            out = head(hidden_states[layer][:, 1:])  # patch tokens (CLS dropped)
            start = 0
            for name, classes in CLASSES.items():
                logits = out[..., start : start + classes].flatten(0, 1)
                loss = F.cross_entropy(logits, getattr(targets, name).flatten())
                parts[name] += loss.item() / len(self.heads)
                total = total + loss
                start += classes
            if on_object.any():
                loss = F.smooth_l1_loss(out[..., start:][on_object].sigmoid(), centre, beta=0.05)
                parts["centre"] += loss.item() / len(self.heads)
                total = total + centre_weight * loss
        return total, parts


@torch.no_grad()
def dense_accuracy(model: CLIPVisionModel, heads: DenseHeads, pixels: torch.Tensor, targets: DenseTargets,
                   image_processor) -> dict[str, float]:
    """Per-patch accuracy of the last head on object patches (colour, shape, size), and its mean centre error."""
    head = heads.heads[-1]
    layer = heads.head_layers[-1]
    correct = {name: 0 for name in CLASSES}
    error, patches = 0.0, 0
    for start in range(0, len(pixels), 128):
        rows = slice(start, start + 128)
        pixel_values = normalise_pixels(pixels[rows], image_processor)
        states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        out = head(states[layer][:, 1:])
        on_object = targets.color[rows] > 0
        offset = 0
        for name, classes in CLASSES.items():
            predicted = out[..., offset : offset + classes].argmax(-1)
            correct[name] += (predicted == getattr(targets, name)[rows])[on_object].sum().item()
            offset += classes
        centre = torch.stack([targets.centre_x[rows], targets.centre_y[rows]], -1)
        error += (out[..., offset:].sigmoid() - centre).abs()[on_object].sum().item() / 2
        patches += on_object.sum().item()
    metrics = {f"held_out_patch_{name}_accuracy": correct[name] / patches for name in CLASSES}
    metrics["held_out_centre_error"] = error / patches  # mean |error| per coordinate, fraction of the canvas
    return metrics


def build_vision_config(config: VitPretrainConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.width,
        intermediate_size=4 * config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        image_size=config.canvas,
        patch_size=config.patch_size,
    )


def pretrain_vit(
    out_dir: str | os.PathLike,
    config: VitPretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    **options,
) -> PretrainResult:
    """Train a tiny CLIPVisionModel with the dense scene-graph objective and save it (with its image processor and
    pretraining.json: config and held-out metrics) to out_dir. `options` override fields of `config`.

    Deterministic by `seed` and `world_seed` for a given machine and thread count.
    """
    config = dataclasses.replace(config or VitPretrainConfig(), **options)
    started = time.perf_counter()
    scenes = pretraining_scenes(config, config.scenes)
    held_out = pretraining_scenes(config, config.held_out, offset=config.scenes)
    pixels, held_out_pixels = render_pixels(scenes), render_pixels(held_out)
    targets = dense_targets(scenes, config.grid, config.min_cover)
    held_out_targets = dense_targets(held_out, config.grid, config.min_cover)
    image_processor = clip_image_processor(config.canvas)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(config.seed)
        model = CLIPVisionModel(build_vision_config(config))
        heads = DenseHeads(config.width, config.head_layers)
    parameters = [*model.parameters(), *heads.parameters()]

    def batch_loss(step: int, rows: torch.Tensor) -> tuple[torch.Tensor, str]:
        batch_targets = DenseTargets(*(getattr(targets, f.name)[rows] for f in dataclasses.fields(DenseTargets)))
        pixel_values = normalise_pixels(pixels[rows], image_processor)
        states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        loss, parts = heads.losses(states, batch_targets, config.centre_weight)
        return loss, "(" + " ".join(f"{name} {value:.3f}" for name, value in parts.items()) + ")"

    model.train()
    schedule = Schedule(config.steps, config.batch_size, config.lr, config.weight_decay, config.warmup_steps,
                        config.seed)
    losses = optimise("vit", parameters, batch_loss, len(scenes), schedule, log)
    model.eval()
    metrics = {
        **loss_summary(losses, 20),
        **dense_accuracy(model, heads, held_out_pixels, held_out_targets, image_processor),
        "seconds": time.perf_counter() - started,
    }
    result = save_pretrained_folder(out_dir, [model, image_processor], dataclasses.asdict(config), metrics)
    if log is not None:
        log(f"vit: held-out per-patch shape accuracy {metrics['held_out_patch_shape_accuracy']:.1%}, "
            f"{metrics['seconds']:.0f} s")
    return result


__all__ = [
    "VitPretrainConfig", "build_vision_config", "clip_image_processor", "pretrain_vit", "pretraining_scenes",
    "render_pixels",
]
