"""Projector weights released by others (LLaVA-1.5 `mm_projector`, LLaVA-SP `non_lora_trainables.bin`), loaded strictly.

The official LLaVA-SP loader uses strict=False, so a checkpoint of the wrong variant loads silently as garbage.
Here every expected key must be present with its shape, and no projector key may be left over.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..projectors import Projector

OFFICIAL_PREFIX = "base_model.model."
# Keys that belong to a LLaVA / LLaVA-SP projector in the official naming (anything else is LLM, ViT or LoRA).
_PROJECTOR_KEY = re.compile(r"^model\.(mm_projector|conv_\w+|query_projector|key_projector|value_projector)(\.|$)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads .safetensors, or an official .bin through torch.load(weights_only=True) (never an arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not a plain tensor dict
        raise ValueError(f"{path}: not a plain tensor checkpoint readable with weights_only=True ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def is_official_projector_key(key: str) -> bool:
    """Whether an official key (without the peft prefix) names a projector tensor."""
    return bool(_PROJECTOR_KEY.match(key))


def official_projector_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips the peft prefix and keeps only projector keys."""
    stripped = {k[len(OFFICIAL_PREFIX):] if k.startswith(OFFICIAL_PREFIX) else k: v for k, v in state.items()}
    return {k: v for k, v in stripped.items() if _PROJECTOR_KEY.match(k)}


def describe_official_variant(keys: set[str]) -> str:
    """Names the projector a set of official keys came from, for error messages."""
    if "model.conv_4.1.weight" in keys:
        sfe = "llava_sp_pooling"
    elif "model.conv_4.weight" in keys:
        sfe = "llava_sp_cropping"
    elif "model.mm_projector.0.weight" in keys:
        return "mlp2x_gelu"
    elif "model.mm_projector.weight" in keys:
        return "linear"
    else:
        return "an unknown projector"
    if "model.query_projector.1.weight" not in keys:
        return f"{sfe}_nodfi" if sfe == "llava_sp_pooling" else f"{sfe} without DFI"
    return sfe


def official_projector_state(
    projector: Projector, state: dict[str, torch.Tensor], label: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Official projector tensors (peft prefix optional; other keys ignored) renamed to `projector`'s own names,
    refusing any checkpoint that is not exactly its variant and shape."""
    state = official_projector_keys(state)
    key_map = projector.official_key_map()
    ours = getattr(projector, "projector_type", type(projector).__name__)
    missing = sorted(set(key_map) - set(state))
    unexpected = sorted(set(state) - set(key_map))
    if missing or unexpected:
        found = describe_official_variant(set(state))
        raise ValueError(
            f"{label} holds a {found} projector, not {ours}: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    own = projector.state_dict()
    converted = {}
    for official_key, our_key in key_map.items():
        tensor = state[official_key]
        if tensor.shape != own[our_key].shape:
            raise ValueError(
                f"{label}: {official_key} has shape {tuple(tensor.shape)} but {ours} expects {tuple(own[our_key].shape)} "
                "(another grid, vision width or LLM width)"
            )
        converted[our_key] = tensor.to(own[our_key].dtype)
    return converted


def load_official_projector(projector: Projector, source: str | Path | dict[str, torch.Tensor], name: str = "") -> None:
    """Loads official weights into `projector`, refusing any checkpoint that is not exactly its variant and shape."""
    label = name or (str(source) if not isinstance(source, dict) else "state dict")
    state = read_state_dict(source) if not isinstance(source, dict) else source
    projector.load_state_dict(official_projector_state(projector, state, label), strict=True)


def export_official_projector(projector: Projector, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our projector's weights under the official names (for tools that still read LLaVA's layout)."""
    own = projector.state_dict()
    return {prefix + official: own[ours].detach().clone() for official, ours in projector.official_key_map().items()}


__all__ = [
    "OFFICIAL_PREFIX",
    "describe_official_variant",
    "export_official_projector",
    "is_official_projector_key",
    "load_official_projector",
    "official_projector_state",
    "read_state_dict",
]
