"""What a saved folder carries so that processes that never import spatial_mllm find its classes: config.json's
`auto_map` names a small module saved beside the weights, which imports them from the installed package.

transformers' Auto classes (with `trust_remote_code=True`) and vLLM's Transformers backend (`vllm serve DIR
--trust-remote-code`) read `auto_map`; the package must be installed where they run (`pip install spatial-mllm`).
"""

from __future__ import annotations

from pathlib import Path

MODULE = "spatial_mllm_auto"
AUTO_MAP = {
    "AutoConfig": f"{MODULE}.SpatialMLLMConfig",
    "AutoModel": f"{MODULE}.SpatialMLLMModel",
    "AutoModelForImageTextToText": f"{MODULE}.SpatialMLLMForConditionalGeneration",
    "AutoProcessor": f"{MODULE}.SpatialMLLMProcessor",
}
SOURCE = '''"""spatial-mllm's classes for transformers' Auto classes (trust_remote_code) and vLLM's Transformers backend.
They come from the installed package: pip install spatial-mllm."""

from spatial_mllm.model import (  # noqa: F401
    SpatialMLLMConfig,
    SpatialMLLMForConditionalGeneration,
    SpatialMLLMModel,
    SpatialMLLMProcessor,
)
'''


def write_module(folder: str | Path) -> Path:
    """Writes the module `auto_map` names into `folder`."""
    path = Path(folder) / f"{MODULE}.py"
    path.write_text(SOURCE, encoding="utf-8")
    return path


__all__ = ["AUTO_MAP", "MODULE", "write_module"]
