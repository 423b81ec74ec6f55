"""Regions, named points and relations of the world, each decided only when its geometric margin is clear.

Coordinates are pixels with the origin at the top left corner and y growing downwards. Margins are fractions of the
canvas side, so a relation means the same thing on every canvas size.
"""

from __future__ import annotations

import math
from typing import Protocol

# The nine regions of a 3x3 grid over the canvas, row-major.
REGIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

# Points a "which is closer" question may name, as fractions of (width, height).
POINTS = {
    "top left corner": (0.0, 0.0),
    "top right corner": (1.0, 0.0),
    "bottom left corner": (0.0, 1.0),
    "bottom right corner": (1.0, 1.0),
    "center of the image": (0.5, 0.5),
}

# Below these margins a relation is considered ambiguous and is never asked or stated.
RELATION_MARGIN = 0.15  # centre offset along the asked axis (left/right, above/below)
DISTANCE_MARGIN = 0.15  # difference between the two centre distances (which is closer)
REGION_MARGIN = 0.05  # distance of a centre from the grid lines (absolute location)


class Located(Protocol):
    x: int
    y: int


def region_box(region: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) cell of `region` in the 3x3 grid."""
    row, col = divmod(REGIONS.index(region), 3)
    return (col * width / 3, row * height / 3, (col + 1) * width / 3, (row + 1) * height / 3)


def region_of(x: float, y: float, width: int, height: int) -> str:
    col = min(int(3 * x / width), 2)
    row = min(int(3 * y / height), 2)
    return REGIONS[3 * row + col]


def clear_region(x: float, y: float, width: int, height: int) -> str | None:
    """The region holding (x, y), or None when the point lies within the margin of a grid line."""
    margin = REGION_MARGIN * min(width, height)
    for line in (width / 3, 2 * width / 3):
        if abs(x - line) < margin:
            return None
    for line in (height / 3, 2 * height / 3):
        if abs(y - line) < margin:
            return None
    return region_of(x, y, width, height)


def near_region(x: float, y: float, region: str, width: int, height: int) -> bool:
    """Whether (x, y) lies in `region` grown by the region margin (so a point outside it is clearly outside)."""
    margin = REGION_MARGIN * min(width, height)
    x0, y0, x1, y1 = region_box(region, width, height)
    return x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin


def horizontal_relation(a: Located, b: Located, canvas: int) -> str | None:
    """'left' or 'right' for a relative to b, None when ambiguous."""
    dx = a.x - b.x
    if abs(dx) < RELATION_MARGIN * canvas:
        return None
    return "left" if dx < 0 else "right"


def vertical_relation(a: Located, b: Located, canvas: int) -> str | None:
    """'above' or 'below' for a relative to b, None when ambiguous."""
    dy = a.y - b.y
    if abs(dy) < RELATION_MARGIN * canvas:
        return None
    return "above" if dy < 0 else "below"


def point_xy(name: str, width: int, height: int) -> tuple[float, float]:
    fx, fy = POINTS[name]
    return (fx * width, fy * height)


def closer_to(point: tuple[float, float], a: Located, b: Located, canvas: int) -> int | None:
    """0 when a is clearly closer to `point`, 1 when b is, None when the distances are too alike."""
    da = math.dist(point, (a.x, a.y))
    db = math.dist(point, (b.x, b.y))
    if abs(da - db) < DISTANCE_MARGIN * canvas:
        return None
    return 0 if da < db else 1
