"""Weights from and to other formats: official LLaVA / LLaVA-SP projectors and releases, transformers' Llava."""

from .llava_export import ExportResult, export_llava
from .llava_import import ImportResult, import_llava
from .official import describe_official_variant, export_official_projector, load_official_projector, read_state_dict

__all__ = [
    "ExportResult",
    "ImportResult",
    "describe_official_variant",
    "export_llava",
    "export_official_projector",
    "import_llava",
    "load_official_projector",
    "read_state_dict",
]
