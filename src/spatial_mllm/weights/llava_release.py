"""What a LLaVA / LLaVA-SP release folder holds, read from its files alone (never from its folder name).

A release is `config.json` (`model_type` "llava" or "llava_llama": the Llama fields plus `mm_*` keys) and either
- LoRA: peft's `adapter_config.json` + `adapter_model.{safetensors,bin}` and `non_lora_trainables.bin` (the projector,
  keys prefixed `base_model.model.`), over a base LLM named by the user (`--model-base`), or
- full: the whole LLM and projector in transformers' layouts (single or sharded, `.bin` or safetensors).
No key names the LLaVA-SP variant: the projector is identified from its weight names and its sizes from their shapes.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, PreTrainedConfig

from ..files import read_json_object
from ..projectors import PROJECTORS
from .checkpoint_files import find_weights
from .official import OFFICIAL_PREFIX, describe_official_variant

CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
PROJECTOR_ONLY = "mm_projector.bin"
LLAVA_MODEL_TYPES = ("llava", "llava_llama")
USUAL_VISION_TOWER = "openai/clip-vit-large-patch14-336"

# The Llama fields of a LLaVA config (LlavaConfig subclasses LlamaConfig); rope_theta / rope_scaling are the names
# older transformers wrote, which LlamaConfig still reads.
_GENERIC_FIELDS = {f.name for f in dataclasses.fields(PreTrainedConfig)}
LLAMA_FIELDS = ({f.name for f in dataclasses.fields(LlamaConfig)} - _GENERIC_FIELDS) | {
    "rope_theta", "rope_scaling", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
}


def local_folder(path: str | Path, flag: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        hint = f"; download it first: hf download {path} --local-dir DIR" if str(path).count("/") == 1 else ""
        raise FileNotFoundError(f"{flag} {path}: no such folder{hint}")
    return folder


@dataclass(frozen=True)
class LlavaRelease:
    folder: Path
    config: dict[str, Any]
    kind: str  # "lora" or "full"

    @property
    def config_file(self) -> Path:
        return self.folder / CONFIG_FILE

    def adapter_weights(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.folder / name).is_file():
                return self.folder / name
        raise FileNotFoundError(f"{self.folder}: {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")

    def setting(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def dtype(self) -> torch.dtype:
        """The dtype the release was saved in (float32 if it does not say)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        dtype = getattr(torch, str(name).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{self.config_file}: torch_dtype {name!r} is not a floating-point dtype")
        return dtype

    def llama_config(self) -> LlamaConfig:
        """The LLM's config: the Llama fields of the LLaVA config, nothing else."""
        fields = {k: v for k, v in self.config.items() if k in LLAMA_FIELDS}
        if fields.get("rope_scaling", "") is None:  # old configs spell "no scaling" so; LlamaConfig warns at it
            del fields["rope_scaling"]
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in fields:
                raise ValueError(f"{self.config_file}: no {key!r}; a LLaVA config carries the Llama fields")
        return LlamaConfig(**fields)

    def check_prompting(self) -> None:
        """Refuses what this toolkit does not reproduce (other image features, extra image tokens, anyres)."""
        problems = []
        if self.setting("mm_vision_select_layer", -2) != -2:
            problems.append(f"mm_vision_select_layer {self.setting('mm_vision_select_layer')} (only -2, LLaVA's)")
        if self.setting("mm_vision_select_feature", "patch") != "patch":
            problems.append(f"mm_vision_select_feature {self.setting('mm_vision_select_feature')!r} (only 'patch')")
        for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if self.setting(key, False):
                problems.append(f"{key} true (extra image tokens; only false, as LLaVA-1.5 and LLaVA-SP use)")
        if self.setting("image_aspect_ratio") == "anyres":
            problems.append("image_aspect_ratio 'anyres' (LLaVA-NeXT tiling)")
        if self.setting("mm_patch_merge_type", "flat") != "flat":
            problems.append(f"mm_patch_merge_type {self.setting('mm_patch_merge_type')!r} (only 'flat')")
        if problems:
            raise ValueError(f"{self.config_file}: not supported: {'; '.join(problems)}")

    @property
    def pads_images(self) -> bool:
        # LLaVA pads to a square only for "pad"; anything else goes straight to the image processor.
        return self.setting("image_aspect_ratio") == "pad"


def read_release(path: str | Path) -> LlavaRelease:
    folder = local_folder(path, "--model-path")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"--model-path {folder}: no {CONFIG_FILE}; not a LLaVA release folder")
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not a LLaVA release ({' or '.join(map(repr, LLAVA_MODEL_TYPES))})"
        )
    if (folder / ADAPTER_CONFIG).is_file():
        release = LlavaRelease(folder, config, "lora")
        release.adapter_weights()
        if not (folder / NON_LORA_TRAINABLES).is_file():
            raise FileNotFoundError(f"{folder}: a LoRA release without {NON_LORA_TRAINABLES} (its projector weights)")
        return release
    if find_weights(folder) is not None:
        return LlavaRelease(folder, config, "full")
    if (folder / PROJECTOR_ONLY).is_file():
        raise ValueError(
            f"{folder} holds only a projector ({PROJECTOR_ONLY}, a stage-1 release): import-llava takes LoRA or full "
            "releases; to start from this projector, build a model and load it with load_official_projector"
        )
    raise FileNotFoundError(f"{folder}: no LLaVA weights (no {ADAPTER_CONFIG}, no model.safetensors or pytorch_model.bin)")


# --- the projector, from its weights --------------------------------------------------------------------------------


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items()}


def projector_variant(names: set[str], where: str) -> str:
    """The registered projector that official tensors of these names (without the peft prefix) belong to."""
    if not names:
        raise ValueError(f"{where} holds no projector weights (model.mm_projector.*): not a LLaVA release's weights")
    variant = describe_official_variant(names)
    if variant not in PROJECTORS:
        raise ValueError(f"{where} holds {variant} (projector weights {sorted(names)[:6]}), which no registered projector reads")
    return variant


def projector_options(variant: str, projector_state: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """The options of `variant` that its tensors' shapes fix, where they differ from the defaults (the SFE token
    width, the Ws bias); the vision width, grid and LLM width are checked when the tensors load."""
    options: dict[str, Any] = {}
    if variant.startswith("llava_sp"):
        options["spatial_width"] = width = int(projector_state["model.conv_24.weight"].shape[0])
        options["ws_bias"] = "model.conv_linear.1.bias" in projector_state
        ws = projector_state.get("model.conv_linear.1.weight")
        if variant.endswith("_nodfi") and ws is not None and ws.shape[-1] == 2 * width:
            # Ws reads SFE + DFI tokens, but no DFI weights were saved (the official script leaves DFI frozen,
            # and intermediate checkpoints miss it): loading it without them would compute garbage.
            raise ValueError(
                f"{where}: its Ws (model.conv_linear.1.weight, {tuple(ws.shape)}) reads {2 * width}-wide SFE + DFI "
                "tokens, but the DFI weights (model.conv_CM.weight, model.{query,key,value}_projector.*) are missing"
            )
    entry = PROJECTORS.get(variant)
    signature = inspect.signature(entry.cls).parameters
    defaults = {k: entry.defaults.get(k, signature[k].default) for k in options}
    return {k: v for k, v in options.items() if defaults[k] != v}


def spatial_grid(projector_state: dict[str, torch.Tensor]) -> int | None:
    """The ViT grid an LLaVA-SP release was trained on (its full-grid SFE conv's kernel), None for other projectors."""
    conv = projector_state.get("model.conv_24.weight")
    return int(conv.shape[-1]) if conv is not None else None


__all__ = [
    "ADAPTER_CONFIG",
    "LlavaRelease",
    "NON_LORA_TRAINABLES",
    "USUAL_VISION_TOWER",
    "local_folder",
    "projector_options",
    "projector_variant",
    "read_release",
    "spatial_grid",
    "strip_prefix",
]
