"""Checks a saved model folder before transformers loads it, so that a missing or broken file is reported by its
name instead of as a traceback from inside the loader (or one naming a temporary folder)."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as WEIGHTS_INDEX
from transformers.utils import SAFE_WEIGHTS_NAME as WEIGHTS_FILE

from ..files import read_json_object
from .configuration import SpatialMLLMConfig


def check_model_folder(folder: str | os.PathLike, what: str = "model folder") -> Path:
    """The folder, if it holds a spatial-mllm config and readable safetensors weights; else a clear error.

    `what` names the folder's role in the messages (e.g. "stage.init_from").
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder}: no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{what} {folder}: not a model folder (no config.json)")
    model_type = read_json_object(config_file).get("model_type")
    if model_type != SpatialMLLMConfig.model_type:
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}, not {SpatialMLLMConfig.model_type!r}; this folder was not "
            "saved by spatial-mllm (build a model from such parts with build_model or the model.* config fields)"
        )
    if (folder / WEIGHTS_FILE).is_file():
        shards = [folder / WEIGHTS_FILE]
    elif (folder / WEIGHTS_INDEX).is_file():
        weight_map = read_json_object(folder / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / WEIGHTS_INDEX}: no 'weight_map' of parameter -> shard file")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{what} {folder}: no weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX}) beside config.json")
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: missing, though {folder / WEIGHTS_INDEX} lists it")
        try:
            with safe_open(shard, "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{shard}: not a readable safetensors file ({err}); was it copied completely?") from None
    return folder


__all__ = ["WEIGHTS_FILE", "WEIGHTS_INDEX", "check_model_folder"]
