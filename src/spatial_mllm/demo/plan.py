"""The demo's settings: sizes and schedules of one run (`DEFAULT` fits 15 minutes on 2 CPU cores, `QUICK` 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .pretrain_llm import LLM_DEFAULT, LLM_QUICK, LlmPretrainConfig
from .pretrain_vision import CLIP_DEFAULT, CLIP_QUICK, ClipPretrainConfig

DEMO_PROJECTORS = ("mlp2x_gelu", "llava_sp_pooling", "llava_sp_cropping", "saep")


@dataclass(frozen=True)
class StagePlan:
    steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    projector_lr: float | None = None


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of one demo setting; `DEFAULT` fits 15 minutes on 2 CPU cores, `QUICK` 2 minutes."""

    world: dict[str, int]
    clip: ClipPretrainConfig
    llm: LlmPretrainConfig
    stage1: StagePlan
    stage2: StagePlan
    lora_r: int | None  # stage 2 trains the LLM by LoRA of this rank, or fully when None
    eval_images: int  # images per evaluation split (all their questions are asked)
    latency_samples: int
    projector_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def _projector_options(vision_width: int) -> dict[str, dict[str, Any]]:
    # LLaVA-SP's SFE tokens are half the ViT width at paper scale (1024 -> 512): keep that ratio for the tiny ViT.
    half = {"spatial_width": vision_width // 2}
    return {"llava_sp_pooling": half, "llava_sp_cropping": half, "llava_sp_pooling_nodfi": half}


# A 96x96 canvas with the ViT's 12-pixel patches: an 8x8 grid (64 patch tokens), on which every projector works.
DEMO_CLIP = dataclasses.replace(CLIP_DEFAULT, patch_size=12, steps=300)
DEFAULT = DemoPlan(
    world={"n_train": 2000, "n_val": 100, "n_test": 150, "n_holdout": 100},
    clip=DEMO_CLIP,
    llm=dataclasses.replace(LLM_DEFAULT, steps=150),
    stage1=StagePlan(steps=100, global_batch_size=32, micro_batch_size=32, lr=2e-3),
    # Full fine-tuning (the recipe's alternative to LoRA): measured, LoRA on a 1.3M-parameter LLM learns to read
    # the image too slowly for the 15-minute budget, as does a stage 2 without the detailed captions.
    stage2=StagePlan(steps=120, global_batch_size=32, micro_batch_size=32, lr=2e-3, projector_lr=2e-3),
    lora_r=None,
    eval_images=100,
    latency_samples=32,
    projector_options=_projector_options(DEMO_CLIP.vision_width),
)
QUICK = DemoPlan(
    world={"n_train": 300, "n_val": 20, "n_test": 30, "n_holdout": 20},
    clip=dataclasses.replace(CLIP_QUICK, patch_size=12),
    llm=LLM_QUICK,
    stage1=StagePlan(steps=10, global_batch_size=16, micro_batch_size=16, lr=2e-3),
    stage2=StagePlan(steps=12, global_batch_size=16, micro_batch_size=16, lr=2e-3, projector_lr=2e-3),
    lora_r=16,  # the quick run goes through the LoRA path (adapter saved beside the model, loaded for evaluation)
    eval_images=20,
    latency_samples=8,
    projector_options=_projector_options(CLIP_QUICK.vision_width),
)


__all__ = ["DEFAULT", "DEMO_PROJECTORS", "DemoPlan", "QUICK", "StagePlan"]
