"""Projector registry. Adding a projector = one file here that registers its class, plus one import line below."""

from .base import PROJECTORS, Projector, VisionGeometry, build_projector
from . import mlp  # noqa: F401  (registers linear, mlp2x_gelu)

__all__ = ["PROJECTORS", "Projector", "VisionGeometry", "build_projector"]
