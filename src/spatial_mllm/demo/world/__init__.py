"""The built-in spatial world: deterministic scenes of coloured shapes, rendered with Pillow, with captions,
instruction conversations and evaluation questions whose answers follow from the scene geometry."""

from .captions import detailed_caption, object_list_caption
from .make import MANIFEST, SCENES_FILE, WORLD_VERSION, make_world, split_files
from .questions import CATEGORIES, MC_SUFFIX, NEGATIVE_STRATEGIES, SHORT_SUFFIX
from .render import render_scene
from .scene import COLORS, SHAPES, SIZES, SPLITS, Scene, WorldConfig, WorldObject, generate_scene

__all__ = [
    "CATEGORIES",
    "COLORS",
    "MANIFEST",
    "MC_SUFFIX",
    "NEGATIVE_STRATEGIES",
    "SCENES_FILE",
    "SHAPES",
    "SHORT_SUFFIX",
    "SIZES",
    "SPLITS",
    "Scene",
    "WORLD_VERSION",
    "WorldConfig",
    "WorldObject",
    "detailed_caption",
    "generate_scene",
    "make_world",
    "object_list_caption",
    "render_scene",
    "split_files",
]
