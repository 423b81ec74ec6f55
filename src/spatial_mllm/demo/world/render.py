"""Draws a scene graph with Pillow: shapes drawn 4x larger then box-filtered (anti-aliasing), plus grey noise."""

from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageChops, ImageDraw

from .scene import Scene, WorldObject

SUPERSAMPLE = 4
NOISE_AMPLITUDE = 12  # grey levels either side: mild, objects stay recognisable at 96 px
STAR_INNER_RATIO = 0.45
# Fixed encoder options so the same scene always gives the same PNG bytes (Pillow writes no timestamp).
PNG_OPTIONS = {"format": "PNG", "compress_level": 3, "optimize": False}  # level 3: smallest and fast here


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of `scene`; a pure function of the scene graph (noise comes from scene.noise_seed)."""
    big = Image.new("RGB", (scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE), (scene.background,) * 3)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        draw_object(draw, obj)
    image = big.resize((scene.width, scene.height), Image.Resampling.BOX)
    return _add_noise(image, random.Random(scene.noise_seed))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def draw_object(draw: ImageDraw.ImageDraw, obj: WorldObject, fill: int | tuple[int, ...] | None = None) -> None:
    """Draws `obj` at the renderer's supersampled scale, in its own colour or in `fill` (e.g. a label value)."""
    s = SUPERSAMPLE
    cx, cy, r = obj.x * s, obj.y * s, obj.r * s
    fill = obj.rgb if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill)
    else:
        draw.polygon(_outline(obj.shape, cx, cy, r), fill=fill)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        # Five points, alternating outer and inner radius, the first pointing up.
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * STAR_INNER_RATIO
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"cannot draw unknown shape {shape!r}")


def _add_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    raw = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    # Map the uniform bytes 0..255 onto 0..2A, then add them with an offset of -A: noise in [-A, A].
    noise = raw.point([v * 2 * NOISE_AMPLITUDE // 255 for v in range(256)])
    return ImageChops.add(image, Image.merge("RGB", (noise, noise, noise)), scale=1.0, offset=-NOISE_AMPLITUDE)
