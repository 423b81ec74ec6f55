"""Loading a model folder for serving or chatting: the model and its processor, with the processor's chat template
(or one from a file, as `vllm serve --chat-template` takes it)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import load_for_inference

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_chat_model(model_dir: str | Path, device: str | None = None, dtype: str | None = None,
                    chat_template: str | Path | None = None):
    """(model, processor) ready for `apply_chat_template`; ValueError naming the folder when it has no template."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch on this machine")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    template = None
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    model, processor = load_for_inference(model_dir, dtype=DTYPES.get(dtype), device=device)
    if template is not None:
        processor.chat_template = template
    if processor.chat_template is None:
        raise ValueError(
            f"{model_dir}: the processor has no chat template (chat_template.jinja); pass one with --chat-template FILE"
        )
    return model, processor


__all__ = ["DTYPES", "load_chat_model"]
