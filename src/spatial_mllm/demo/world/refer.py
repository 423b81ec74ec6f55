"""Referring expressions: the shortest description that picks out exactly one object of a scene."""

from __future__ import annotations

from typing import Sequence

from .scene import WorldObject

ATTRIBUTE_ORDER = ("size", "color", "shape")
# Candidate attribute sets, tried in order. Relations always name colour and shape, adding size when needed.
REFERENCE = (("color", "shape"), ("size", "color", "shape"))
WITHOUT = {
    "color": (("shape",), ("size", "shape")),
    "shape": (("color",), ("size", "color")),
    "size": (("color", "shape"),),
}


def phrase(obj: WorldObject, attributes: Sequence[str]) -> str:
    """e.g. 'large red circle', or 'red object' when the shape is not named."""
    words = [getattr(obj, name) for name in ATTRIBUTE_ORDER if name in attributes]
    if "shape" not in attributes:
        words.append("object")
    return " ".join(words)


def describe(index: int, objects: Sequence[WorldObject], candidates: Sequence[Sequence[str]]) -> str | None:
    """The first candidate attribute set that matches objects[index] only, as a phrase; None if none does."""
    target = objects[index]
    for attributes in candidates:
        key = [getattr(target, name) for name in attributes]
        matches = sum(1 for obj in objects if [getattr(obj, name) for name in attributes] == key)
        if matches == 1:
            return phrase(target, attributes)
    return None


def reference(index: int, objects: Sequence[WorldObject]) -> str:
    """How text names objects[index] in relations; scenes never repeat a (size, colour, shape) triple."""
    text = describe(index, objects, REFERENCE)
    if text is None:
        raise ValueError(f"object {index} of the scene repeats another object's size, colour and shape")
    return text


def reference_without(index: int, objects: Sequence[WorldObject], attribute: str) -> str | None:
    """A unique description that does not give away `attribute` (for asking about it), or None."""
    return describe(index, objects, WITHOUT[attribute])
