"""Weights from and to other formats: official LLaVA / LLaVA-SP projectors, transformers' Llava."""

from .official import describe_official_variant, export_official_projector, load_official_projector, read_state_dict

__all__ = ["describe_official_variant", "export_official_projector", "load_official_projector", "read_state_dict"]
