"""Reading the weights of a checkpoint folder in the layouts transformers and LLaVA write, strictly.

A folder holds one of: `model.safetensors`, `model.safetensors.index.json` + shards, `pytorch_model.bin`,
`pytorch_model.bin.index.json` + shards (safetensors preferred when both exist, since they need no unpickling).
The index must describe its shards exactly: every listed shard present, every tensor in the shard the index names,
no tensor in two shards. `.bin` files are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import read_json_object
from .official import read_state_dict

# (single file, index file), in order of preference
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def find_weights(folder: Path) -> list[Path] | None:
    """The weight files of `folder` (one, or the shards its index lists), or None if it has none."""
    for single, index in WEIGHT_LAYOUTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return [folder / name for name in sorted(set(read_index(folder / index).values()))]
    return None


def read_index(path: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of an index json."""
    weight_map = read_json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: no 'weight_map' of tensor name -> shard file")
    return weight_map


def read_weights(folder: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of the folder's checkpoint, by name; `what` names the folder's role in errors."""
    folder = Path(folder)
    for single, index in WEIGHT_LAYOUTS:
        if (folder / single).is_file():
            return _read_file(folder / single)
        if (folder / index).is_file():
            return _read_shards(folder / index)
    names = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise FileNotFoundError(f"{what} {folder}: no weights (none of {names})")


def weight_names(folder: str | Path, what: str = "checkpoint") -> set[str]:
    """The tensor names of the folder's checkpoint, from the index or the safetensors header when there is one
    (cheap: a wrong release is refused before gigabytes are read); a single .bin has to be read whole."""
    folder = Path(folder)
    for single, index in WEIGHT_LAYOUTS:
        if (folder / index).is_file() and not (folder / single).is_file():
            return set(read_index(folder / index))
        if (folder / single).is_file() and single.endswith(".safetensors"):
            try:
                with safe_open(folder / single, "pt") as weights:
                    return set(weights.keys())
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{folder / single}: not a readable safetensors file ({err})") from None
    return set(read_weights(folder, what))


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err}); was it copied completely?") from None


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_index(index)
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    state: dict[str, torch.Tensor] = {}
    for shard, listed in sorted(by_shard.items()):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing, though {index} lists it")
        tensors = _read_file(path)
        unlisted = sorted(set(tensors) - listed)
        absent = sorted(listed - set(tensors))
        if unlisted or absent:
            raise ValueError(
                f"{path} does not hold what {index.name} says: not in the index {unlisted[:5]}, "
                f"listed but absent {absent[:5]}"
            )
        state.update(tensors)  # the index maps each name to one shard, so no name is read twice
    return state


__all__ = ["WEIGHT_LAYOUTS", "find_weights", "read_index", "read_weights", "weight_names"]
