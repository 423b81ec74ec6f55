"""Scene graphs of the built-in spatial world and their deterministic generator.

A scene is a few non-overlapping objects (shape, colour, size, centre) on a noisy grey canvas. Some attribute
combinations and placements are held out: they never occur in train/val/test scenes and each hold-out scene holds
exactly one of them, so a model's compositional generalisation can be measured.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

from .geometry import REGIONS, clear_region, near_region

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Well separated hues on a dark background; each object gets a small per-channel jitter around its colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 230),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
# Half extent of an object as a fraction of the canvas side: 8 px and 14 px on the default 96 px canvas.
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}
SPLITS = ("train", "val", "test", "holdout")
HOLDOUT_SPLIT = "holdout"

COLOR_JITTER = 12  # per channel, keeps every colour far from its neighbours
BACKGROUND_LEVELS = (25, 60)  # grey level range of the background
OBJECT_GAP = 0.04  # minimal gap between two bounding boxes, fraction of the canvas
PLACEMENT_TRIES = 200
SCENE_TRIES = 50

Pair = tuple[str, str]


@dataclass(frozen=True)
class WorldObject:
    """One object; (x, y) is its centre in pixels, r its half extent, so its bounding box is x-r..x+r."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    r: int
    rgb: tuple[int, int, int]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)

    @property
    def pair(self) -> Pair:
        return (self.color, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "r": self.r,
            "bbox": list(self.bbox),
            "rgb": list(self.rgb),
        }


@dataclass(frozen=True)
class HoldoutMark:
    """Which held-out combination a hold-out scene shows: kind 'color_shape' (colour, shape) or 'shape_region'
    (shape, region), carried by objects[object]."""

    kind: str
    combination: Pair
    object: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "combination": list(self.combination), "object": self.object}


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    width: int
    height: int
    background: int
    noise_seed: int
    objects: tuple[WorldObject, ...]
    holdout: HoldoutMark | None = None

    @property
    def image(self) -> str:
        """Path of the PNG relative to the world folder."""
        return f"images/{self.id}.png"

    @property
    def canvas(self) -> int:
        return min(self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "split": self.split,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "noise_seed": self.noise_seed,
            "objects": [obj.to_dict() for obj in self.objects],
            "holdout": self.holdout.to_dict() if self.holdout else None,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Scene":
        objects = tuple(
            WorldObject(o["shape"], o["color"], o["size"], o["x"], o["y"], o["r"], tuple(o["rgb"]))
            for o in record["objects"]
        )
        mark = record.get("holdout")
        holdout = HoldoutMark(mark["kind"], tuple(mark["combination"]), mark["object"]) if mark else None
        return cls(
            record["id"], record["split"], record["width"], record["height"], record["background"],
            record["noise_seed"], objects, holdout,
        )  # fmt: skip


@dataclass(frozen=True)
class WorldConfig:
    """What scenes look like. The hold-out lists name (colour, shape) pairs and (shape, region) placements that
    train/val/test scenes never contain."""

    canvas: int = 96
    min_objects: int = 2
    max_objects: int = 5
    holdout_color_shape: tuple[Pair, ...] = (("red", "triangle"), ("blue", "star"), ("green", "square"))
    holdout_shape_region: tuple[Pair, ...] = (("circle", "top left"), ("triangle", "bottom right"))

    def __post_init__(self) -> None:
        if self.canvas < 32:
            raise ValueError(f"canvas must be at least 32 pixels, got {self.canvas}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                f"objects per scene must satisfy 1 <= min_objects <= max_objects <= 8, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for color, shape in self.holdout_color_shape:
            if color not in COLORS or shape not in SHAPES:
                raise ValueError(f"hold-out colour+shape pair {(color, shape)} names an unknown colour or shape")
        for shape, region in self.holdout_shape_region:
            if shape not in SHAPES or region not in REGIONS:
                raise ValueError(f"hold-out shape+region pair {(shape, region)} names an unknown shape or region")

    def half_extent(self, size: str) -> int:
        """Half extent in pixels of an object of `size` on this canvas."""
        return max(2, round(SIZES[size] * self.canvas))

    def allowed_pairs(self, split: str) -> tuple[Pair, ...]:
        """The (colour, shape) pairs that scenes and text of `split` may contain or name."""
        held = set() if split == HOLDOUT_SPLIT else set(self.holdout_color_shape)
        return tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in held)

    def holdout_combinations(self) -> list[tuple[str, Pair]]:
        return [("color_shape", p) for p in self.holdout_color_shape] + [
            ("shape_region", p) for p in self.holdout_shape_region
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "canvas": self.canvas,
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "holdout_color_shape": [list(p) for p in self.holdout_color_shape],
            "holdout_shape_region": [list(p) for p in self.holdout_shape_region],
        }


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_scene(config: WorldConfig, rng: random.Random, scene_id: str, split: str, noise_seed: int) -> Scene:
    """A random scene; hold-out split scenes carry exactly one held-out combination, other splits none."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    count = rng.randint(config.min_objects, config.max_objects)
    background = rng.randint(*BACKGROUND_LEVELS)
    for _ in range(SCENE_TRIES):
        mark = _pick_holdout(config, rng) if split == HOLDOUT_SPLIT else None
        objects = _place_objects(config, rng, count, mark)
        if objects is not None:
            # The held-out object is placed first (it is the most constrained); shuffle so it is not always first.
            order = list(range(len(objects)))
            rng.shuffle(order)
            holdout = HoldoutMark(mark[0], mark[1], order.index(0)) if mark else None
            objects = tuple(objects[i] for i in order)
            return Scene(scene_id, split, config.canvas, config.canvas, background, noise_seed, objects, holdout)
    raise ValueError(
        f"could not place {count} objects without overlap on a {config.canvas} px canvas after {SCENE_TRIES} tries; "
        f"lower max_objects or enlarge the canvas"
    )


def _pick_holdout(config: WorldConfig, rng: random.Random) -> tuple[str, Pair]:
    combos = config.holdout_combinations()
    if not combos:
        raise ValueError("the hold-out split needs at least one hold-out combination in the world config")
    return rng.choice(combos)


def _place_objects(
    config: WorldConfig, rng: random.Random, count: int, mark: tuple[str, Pair] | None
) -> list[WorldObject] | None:
    """Objects with distinct (size, colour, shape) and no overlap, or None when placement got stuck."""
    placed: list[WorldObject] = []
    for index in range(count):
        if index == 0 and mark is not None:
            attributes, accept = _holdout_object(config, rng, mark)
        else:
            attributes = _ordinary_attributes(config, rng, placed)
            accept = _train_placement(config, attributes[0])
        obj = _place(config, rng, attributes, placed, accept)
        if obj is None:
            return None
        placed.append(obj)
    return placed


def _ordinary_attributes(config: WorldConfig, rng: random.Random, placed: list[WorldObject]) -> tuple[str, str, str]:
    taken = {(o.shape, o.color, o.size) for o in placed}
    held = set(config.holdout_color_shape)
    while True:
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        if (color, shape) not in held and (shape, color, size) not in taken:
            return shape, color, size


def _train_placement(config: WorldConfig, shape: str) -> Callable[[int, int], bool]:
    """Centres allowed for `shape` outside the hold-out split: clearly away from its held-out regions."""
    regions = [region for held_shape, region in config.holdout_shape_region if held_shape == shape]

    def accept(x: int, y: int) -> bool:
        return not any(near_region(x, y, region, config.canvas, config.canvas) for region in regions)

    return accept


def _holdout_object(
    config: WorldConfig, rng: random.Random, mark: tuple[str, Pair]
) -> tuple[tuple[str, str, str], Callable[[int, int], bool]]:
    kind, combination = mark
    size = rng.choice(list(SIZES))
    if kind == "color_shape":
        color, shape = combination
        return (shape, color, size), _train_placement(config, shape)
    shape, region = combination
    held = set(config.holdout_color_shape)
    color = rng.choice([c for c in COLORS if (c, shape) not in held])

    def accept(x: int, y: int) -> bool:
        return clear_region(x, y, config.canvas, config.canvas) == region

    return (shape, color, size), accept


def _place(
    config: WorldConfig,
    rng: random.Random,
    attributes: tuple[str, str, str],
    placed: list[WorldObject],
    accept: Callable[[int, int], bool],
) -> WorldObject | None:
    shape, color, size = attributes
    r = config.half_extent(size)
    gap = max(2, round(OBJECT_GAP * config.canvas))
    low, high = r + 1, config.canvas - r - 1
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.randint(low, high), rng.randint(low, high)
        if accept(x, y) and all(_box_gap(x, y, r, other) >= gap for other in placed):
            base = COLORS[color]
            rgb = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in base)
            return WorldObject(shape, color, size, x, y, r, rgb)
    return None


def _box_gap(x: int, y: int, r: int, other: WorldObject) -> int:
    """Gap between two boxes: the larger of the horizontal and vertical gaps (negative when they overlap)."""
    gap_x = max(other.x - other.r - (x + r), x - r - (other.x + other.r))
    gap_y = max(other.y - other.r - (y + r), y - r - (other.y + other.r))
    return max(gap_x, gap_y)
