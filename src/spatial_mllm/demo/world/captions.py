"""Captions of a scene: an object list (CLIP-style pretraining) and a detailed description with relations (stage 1)."""

from __future__ import annotations

import random

from .geometry import clear_region, horizontal_relation, vertical_relation
from .refer import phrase, reference
from .scene import Scene

FULL = ("size", "color", "shape")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
MAX_RELATIONS = 2
# Instructions of the stage-1 human turn (LLaVA's plain template drops them; a chat template keeps them).
BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize the scene.",
)
DETAIL_PROMPTS = ("Describe the image in detail.", "Describe the objects in the image and where they are.")


def reading_order(scene: Scene) -> list[int]:
    """Object indices left to right, top to bottom on ties."""
    return sorted(range(len(scene.objects)), key=lambda i: (scene.objects[i].x, scene.objects[i].y))


def object_list_caption(scene: Scene) -> str:
    """e.g. 'a large red circle, a small blue square', left to right."""
    return ", ".join(f"a {phrase(scene.objects[i], FULL)}" for i in reading_order(scene))


def detailed_caption(scene: Scene, rng: random.Random) -> str:
    """Object count, each object with its region when clear, then up to two clear pairwise relations."""
    objects = scene.objects
    n = len(objects)
    sentences = ["There is one object." if n == 1 else f"There are {NUMBER_WORDS[n]} objects."]
    for i in reading_order(scene):
        obj = objects[i]
        region = clear_region(obj.x, obj.y, scene.width, scene.height)
        full = phrase(obj, FULL)
        sentences.append(f"A {full} is at the {region}." if region else f"There is a {full}.")
    relations = []
    for i in range(n):
        for j in range(i + 1, n):  # one direction per pair: "A left of B" already says "B right of A"
            for relation in (horizontal_relation, vertical_relation):
                word = relation(objects[i], objects[j], scene.canvas)
                if word is not None:
                    relations.append((i, j, word))
    for i, j, word in rng.sample(relations, min(MAX_RELATIONS, len(relations))):
        sentences.append(f"The {reference(i, objects)} is {RELATION_WORDS[word]} the {reference(j, objects)}.")
    return " ".join(sentences)
