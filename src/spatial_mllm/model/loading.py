"""Loading a saved model folder, strictly: every weight must fit the config, the tokenizer must be the one the
model was built with, the processor must expand images to the projector's token count, and a LoRA adapter is
attached only when the run that wrote the folder listed it as its own. Anything else is refused with a message
naming the folder and the first mismatches, never a warning and a score.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

from safetensors import safe_open

from ..cache import tokenizer_digest
from ..files import read_json_object
from .adapter import ADAPTER_FILES, attach_adapter
from .configuration import RUN_INFO_FILE
from .folder import WEIGHTS_FILE, WEIGHTS_INDEX, check_model_folder
from .modeling import SpatialMLLMForConditionalGeneration
from .processing import SpatialMLLMProcessor

logger = logging.getLogger(__name__)


def run_info(folder: Path) -> dict[str, Any]:
    """What the run that wrote the folder recorded beside it (empty for folders not written by a run)."""
    path = folder / RUN_INFO_FILE
    return read_json_object(path) if path.is_file() else {}


def adapter_is_its_own(folder: Path, info: dict[str, Any]) -> bool:
    """Whether the folder's LoRA adapter belongs to the model: present, and listed by the run that wrote the folder
    (an adapter a later full fine-tune into the same folder left behind is not)."""
    if not all((folder / name).is_file() for name in ADAPTER_FILES):
        return False
    listed = info.get("files")
    if listed is not None and not set(ADAPTER_FILES) <= set(listed):
        logger.warning("%s: ignoring %s, which the run that wrote this folder did not write", folder, ", ".join(ADAPTER_FILES))
        return False
    return True


def load_model_folder(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, what: str = "model folder", adapter: bool = True
) -> tuple[SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor]:
    """Model and processor of a folder saved by training, merging, importing or `save_pretrained`.

    `adapter=False` leaves a LoRA adapter beside the model unattached (e.g. to merge it, or to refuse it).
    """
    folder = check_model_folder(folder, what)
    info = run_info(folder)
    model = _load_weights(folder, dtype, what)
    if adapter and adapter_is_its_own(folder, info):
        attach_adapter(model, folder)
    processor = SpatialMLLMProcessor.from_pretrained(folder)
    check_fits(model, processor, folder)
    return model, processor


# Weight names of folders saved before the model took transformers' Llava layout (model.* + lm_head).
LEGACY_KEY_MAPPING = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^projector\.": "model.projector.",
    r"^vision_tower\.": "model.vision_tower.",
}


def _weight_names(folder: Path) -> list[str]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return list(read_json_object(index).get("weight_map", {}))
    with safe_open(folder / WEIGHTS_FILE, "pt") as weights:
        return list(weights.keys())


def _load_weights(folder: Path, dtype: torch.dtype | None, what: str) -> SpatialMLLMForConditionalGeneration:
    # transformers would attach an adapter it finds beside the weights: load from a view without the adapter files,
    # so that attaching it is our decision (and as strict as the rest).
    with tempfile.TemporaryDirectory() as view:
        for path in folder.iterdir():
            if path.is_file() and path.name not in ADAPTER_FILES:
                (Path(view) / path.name).symlink_to(path.resolve())
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # mismatches are reported below, as an error
        try:
            legacy = any(name.startswith(("language_model.", "projector.")) for name in _weight_names(folder))
            model, loading = SpatialMLLMForConditionalGeneration.from_pretrained(
                view, dtype=dtype, output_loading_info=True, key_mapping=LEGACY_KEY_MAPPING if legacy else None
            )
        except (RuntimeError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0][:300]
            raise ValueError(f"{what} {folder}: the weights do not fit its config.json ({first})") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
    problems = {
        kind: sorted(loading.get(key) or [])
        for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mismatched", "mismatched_keys"))
    }
    if any(problems.values()):
        found = "; ".join(f"{kind} {[str(k) for k in keys[:4]]}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                          for kind, keys in problems.items() if keys)
        raise ValueError(
            f"{what} {folder}: the weights do not fit its config.json ({model.config.projector_type} projector): {found}; "
            "were files of two models mixed in one folder?"
        )
    return model


def check_fits(model: SpatialMLLMForConditionalGeneration, processor: SpatialMLLMProcessor, folder: Path) -> None:
    """The processor and tokenizer saved beside the model must be the ones it works with."""
    if processor.num_image_tokens != model.num_image_tokens:
        raise ValueError(
            f"{folder}: processor_config.json expands each image to {processor.num_image_tokens} tokens but the "
            f"model's {model.config.projector_type} projector makes {model.num_image_tokens}; the folder mixes files "
            "of two models"
        )
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"{folder}: the tokenizer's {processor.image_token} is id {processor.image_token_id} but the model's "
            f"config.json says image_token_id {model.config.image_token_id}; the tokenizer is not the model's"
        )
    rows = model.get_input_embeddings().num_embeddings
    # The image token may lie past the embeddings (imported LLaVA releases keep their vocabulary): it is never embedded.
    outside = processor.image_token_id >= rows
    if len(processor.tokenizer) - outside > rows:
        raise ValueError(
            f"{folder}: the tokenizer has {len(processor.tokenizer)} tokens but the model's embeddings only {rows}; "
            "the tokenizer is not the model's"
        )
    expected = getattr(model.config, "tokenizer_digest", None)
    if expected is not None and tokenizer_digest(processor.tokenizer) != expected:
        raise ValueError(
            f"{folder}: the tokenizer's vocabulary differs from the one the model was built with (config.json "
            "tokenizer_digest); the tokenizer files are not the model's"
        )


def load_for_inference(model_dir: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None):
    """`load_model_folder`, in eval mode, on `device`."""
    model, processor = load_model_folder(model_dir, dtype)
    model = model.eval()
    if device:
        model = model.to(device)
    return model, processor


__all__ = ["adapter_is_its_own", "check_fits", "load_for_inference", "load_model_folder", "run_info"]
