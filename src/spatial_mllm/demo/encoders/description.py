"""The written scene description: what the world's LLM reads in place of the image before any image is shown.

Every object with its size, colour, shape and a position the model can compare: x and y on a 0-9 scale
(tenths of the canvas, y downwards), e.g.
"There are three objects: a large red circle at x 2 y 7; a small blue square at x 6 y 1; a small white star at x 5
y 4." Tenths suffice: clear left/right and above/below relations differ by at least 0.15 of the canvas, so by at
least one step, and a clear region (centre at least 0.05 from the thirds) is fixed by the step (0-2 left, 3-6
centre, 7-9 right).
"""

from __future__ import annotations

import random

from ..world.captions import NUMBER_WORDS
from ..world.scene import Scene, WorldObject

POSITION_STEPS = 10


def position_step(value: float, side: int) -> int:
    """A coordinate in pixels as a step 0..9 of the canvas side."""
    return min(POSITION_STEPS - 1, max(0, int(POSITION_STEPS * value / side)))


def object_phrase(obj: WorldObject, width: int, height: int) -> str:
    return (f"a {obj.size} {obj.color} {obj.shape} at x {position_step(obj.x, width)} "
            f"y {position_step(obj.y, height)}")


def describe_scene(scene: Scene, rng: random.Random | None = None) -> str:
    """The description of `scene`: objects left to right, or in an order shuffled by `rng` (pretraining varies it
    so that the model reads positions, not the order)."""
    order = list(range(len(scene.objects)))
    if rng is None:
        order.sort(key=lambda i: (scene.objects[i].x, scene.objects[i].y))
    else:
        rng.shuffle(order)
    phrases = [object_phrase(scene.objects[i], scene.width, scene.height) for i in order]
    count = len(phrases)
    if count == 0:
        return "There are no objects."
    head = "There is one object: " if count == 1 else f"There are {NUMBER_WORDS[count]} objects: "
    return head + "; ".join(phrases) + "."


__all__ = ["POSITION_STEPS", "describe_scene", "object_phrase", "position_step"]
