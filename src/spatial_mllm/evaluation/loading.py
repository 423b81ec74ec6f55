"""Loading a trained model folder for inference, whatever way it was trained (full, projector-only, LoRA)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor
from ..model.folder import check_model_folder


def load_for_inference(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    model_dir = check_model_folder(model_dir)
    model = SpatialMLLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    if device:
        model = model.to(device)
    processor = SpatialMLLMProcessor.from_pretrained(model_dir)
    return model, processor
