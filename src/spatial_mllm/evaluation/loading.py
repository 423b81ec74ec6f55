"""Loading a trained model folder for inference, whatever way it was trained (full, projector-only, LoRA)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor


def load_for_inference(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    model = SpatialMLLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    if device:
        model = model.to(device)
    processor = SpatialMLLMProcessor.from_pretrained(model_dir)
    return model, processor
