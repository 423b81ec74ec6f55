"""Projector registry. Adding a projector = one file here whose class is decorated with
`@register_projector("name")`, plus one import line below."""

from .base import PROJECTORS, Projector, ProjectorEntry, VisionGeometry, build_projector, register_projector
from . import mlp  # noqa: F401  (registers linear, mlp2x_gelu)
from . import llava_sp  # noqa: F401  (registers llava_sp_pooling, llava_sp_cropping, llava_sp_pooling_nodfi)
from . import saep  # noqa: F401  (registers saep)
from . import ldpv2  # noqa: F401  (registers ldpv2)
from . import c_abstractor  # noqa: F401  (registers c_abstractor)
from . import tokenpacker  # noqa: F401  (registers tokenpacker)

__all__ = ["PROJECTORS", "Projector", "ProjectorEntry", "VisionGeometry", "build_projector", "register_projector"]
