"""Questions about a scene graph, with answers read off its geometry, posed as short-answer or multiple choice.

Every asker returns None when its question would be ambiguous in the scene (no object it can name uniquely, no
pair of objects whose relation clears the margin), so every answer it gives is certain.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .geometry import POINTS, REGIONS, clear_region, closer_to, horizontal_relation, point_xy, vertical_relation
from .refer import reference, reference_without
from .scene import COLORS, SHAPES, SIZES, Pair, Scene, WorldConfig

SHORT_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCD"

# Evaluation categories and the group each one reports under.
CATEGORIES: dict[str, str] = {
    "existence": "existence",
    "count": "count",
    "color": "attribute",
    "shape": "attribute",
    "size": "attribute",
    "size_compare": "attribute",
    "left_right": "spatial",
    "above_below": "spatial",
    "location": "spatial",
    "closer": "spatial",
}
NEGATIVE_STRATEGIES = ("random", "popular", "adversarial")
MAX_COUNT_OPTION = 6
PRESENT_BIAS = 0.7  # how often a counting question names a kind of object the scene does hold


@dataclass(frozen=True)
class QA:
    """A question stem with its answer. distractors: wrong answers a multiple-choice form may offer (none: the
    question is only asked in short form). objects: indices of the scene objects it is about. subject: the one
    object it asks about (for a relation or comparison, the first object named), None when there is no single one
    (counting, absent objects, several objects of the named kind)."""

    category: str
    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    objects: tuple[int, ...] = ()
    subject: int | None = None


@dataclass(frozen=True)
class PosedQuestion:
    """A QA as the model sees it. text: stem, options (multiple choice) and suffix. answer: the expected reply
    (the answer text, or the option letter); answer_text: the answer in words either way."""

    category: str
    question: str
    text: str
    format: str  # "short" | "mc"
    answer: str
    answer_text: str
    options: tuple[str, ...]
    objects: tuple[int, ...]
    subject: int | None


@dataclass(frozen=True)
class TextPolicy:
    """The (colour, shape) pairs text of one split may name (never a held-out pair outside the hold-out split),
    `popular` sorted by how often the split's scenes hold them, most frequent first (POPE's popular negatives)."""

    allowed: tuple[Pair, ...]
    popular: tuple[Pair, ...]

    @classmethod
    def for_split(cls, config: WorldConfig, split: str, scenes: Iterable[Scene]) -> "TextPolicy":
        allowed = config.allowed_pairs(split)
        counts = Counter(obj.pair for scene in scenes for obj in scene.objects)
        popular = tuple(sorted(allowed, key=lambda pair: (-counts[pair], pair)))
        return cls(allowed, popular)


def pose(qa: QA, rng: random.Random, mc_probability: float) -> PosedQuestion:
    if qa.distractors and rng.random() < mc_probability:
        return pose_multiple_choice(qa, rng)
    return pose_short(qa)


def pose_short(qa: QA) -> PosedQuestion:
    text = f"{qa.question}\n{SHORT_SUFFIX}"
    return PosedQuestion(qa.category, qa.question, text, "short", qa.answer, qa.answer, (), qa.objects, qa.subject)


def pose_multiple_choice(qa: QA, rng: random.Random) -> PosedQuestion:
    if not qa.distractors:
        raise ValueError(f"a {qa.category} question without distractors cannot be multiple choice")
    wrong = rng.sample(qa.distractors, min(len(OPTION_LETTERS) - 1, len(qa.distractors)))
    options = [qa.answer, *wrong]
    rng.shuffle(options)
    lines = [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
    text = "\n".join([qa.question, *lines, MC_SUFFIX])
    letter = OPTION_LETTERS[options.index(qa.answer)]
    return PosedQuestion(
        qa.category, qa.question, text, "mc", letter, qa.answer, tuple(options), qa.objects, qa.subject
    )


def existence_question(pair: Pair) -> str:
    color, shape = pair
    article = "an" if color[0] in "aeiou" else "a"
    return f"Is there {article} {color} {shape} in the image?"


def negative_pairs(scene: Scene, strategy: str, k: int, rng: random.Random, policy: TextPolicy) -> list[Pair]:
    """Up to k (colour, shape) pairs absent from the scene, sampled as POPE does: uniformly ('random'), most
    frequent in the split first ('popular'), or sharing a colour or shape with present objects ('adversarial',
    our stand-in for POPE's co-occurring objects), most shared first."""
    present = {obj.pair for obj in scene.objects}
    absent = [pair for pair in policy.allowed if pair not in present]
    if strategy == "random":
        return rng.sample(absent, min(k, len(absent)))
    if strategy == "popular":
        return [pair for pair in policy.popular if pair not in present][:k]
    if strategy == "adversarial":
        shared = {pair: sum(pair[0] == o.color or pair[1] == o.shape for o in scene.objects) for pair in absent}
        candidates = [pair for pair in absent if shared[pair] > 0]
        rng.shuffle(candidates)  # random order among equally confusable pairs
        return sorted(candidates, key=lambda pair: -shared[pair])[:k]
    raise ValueError(f"unknown negative sampling strategy {strategy!r}; expected one of {NEGATIVE_STRATEGIES}")


def ask_existence(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    if rng.random() < 0.5:
        index = rng.randrange(len(scene.objects))
        pair = scene.objects[index].pair
        holders = tuple(i for i, o in enumerate(scene.objects) if o.pair == pair)
        subject = holders[0] if len(holders) == 1 else None
        return QA("existence", existence_question(pair), "yes", (), holders, subject)
    negatives = negative_pairs(scene, rng.choice(NEGATIVE_STRATEGIES), 1, rng, policy)
    return QA("existence", existence_question(negatives[0]), "no") if negatives else None


def ask_count(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA:
    objects = scene.objects
    kind = rng.choice(("all", "shape", "color", "size", "color_shape"))
    if kind == "all":
        noun, selected = "objects", list(range(len(objects)))
    elif kind == "color_shape":
        color, shape = _present_or_any(rng, [o.pair for o in objects], policy.allowed)
        noun, selected = f"{color} {shape}s", [i for i, o in enumerate(objects) if o.pair == (color, shape)]
    else:
        vocabulary = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}[kind]
        value = _present_or_any(rng, [getattr(o, kind) for o in objects], vocabulary)
        noun = f"{value}s" if kind == "shape" else f"{value} objects"
        selected = [i for i, o in enumerate(objects) if getattr(o, kind) == value]
    answer = str(len(selected))
    distractors = tuple(str(n) for n in range(MAX_COUNT_OPTION + 1) if n != len(selected))
    return QA("count", f"How many {noun} are in the image?", answer, distractors, tuple(selected))


def ask_color(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    return _ask_attribute(scene, rng, "color", "What color is the {}?", tuple(COLORS))


def ask_shape(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    return _ask_attribute(scene, rng, "shape", "What shape is the {}?", SHAPES)


def ask_size(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    return _ask_attribute(scene, rng, "size", "Is the {} small or large?", tuple(SIZES))


def ask_size_compare(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    objects = scene.objects
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if objects[i].r != objects[j].r]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    word = rng.choice(("larger", "smaller"))
    winner = i if (objects[i].r > objects[j].r) == (word == "larger") else j
    loser = j if winner == i else i
    a, b = reference(i, objects), reference(j, objects)
    question = f"Which is {word}, the {a} or the {b}?"
    return QA("size_compare", question, reference(winner, objects), (reference(loser, objects),), (i, j), i)


def ask_left_right(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    return _ask_relation(scene, rng, "left_right", horizontal_relation, ("left", "right"),
                         "Is the {} to the left or to the right of the {}?")  # fmt: skip


def ask_above_below(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    return _ask_relation(scene, rng, "above_below", vertical_relation, ("above", "below"),
                         "Is the {} above or below the {}?")  # fmt: skip


def ask_location(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    located = [(i, clear_region(o.x, o.y, scene.width, scene.height)) for i, o in enumerate(scene.objects)]
    located = [(i, region) for i, region in located if region is not None]
    if not located:
        return None
    index, region = rng.choice(located)
    question = f"Where is the {reference(index, scene.objects)} in the image?"
    return QA("location", question, region, tuple(r for r in REGIONS if r != region), (index,), index)


def ask_closer(scene: Scene, rng: random.Random, policy: TextPolicy) -> QA | None:
    """Which of two objects is closer to a third object or to a named point of the image."""
    objects, canvas = scene.objects, scene.canvas
    to_objects, to_points = [], []
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            for ref in range(len(objects)):
                if ref not in (i, j):
                    winner = closer_to((objects[ref].x, objects[ref].y), objects[i], objects[j], canvas)
                    if winner is not None:
                        to_objects.append((reference(ref, objects), (ref,), i, j, winner))
            for name in POINTS:
                winner = closer_to(point_xy(name, scene.width, scene.height), objects[i], objects[j], canvas)
                if winner is not None:
                    to_points.append((name, (), i, j, winner))
    choices = [c for c in (to_objects, to_points) if c]
    if not choices:
        return None
    target, extra, i, j, winner = rng.choice(rng.choice(choices))
    if rng.random() < 0.5:  # either object may be named first
        i, j, winner = j, i, 1 - winner
    a, b = reference(i, objects), reference(j, objects)
    right, wrong = (a, b) if winner == 0 else (b, a)
    subject = extra[0] if extra else i  # the first object named: the target when it is an object
    return QA("closer", f"Which is closer to the {target}, the {a} or the {b}?", right, (wrong,), (*extra, i, j),
              subject)  # fmt: skip


ASKERS: dict[str, Callable[[Scene, random.Random, TextPolicy], QA | None]] = {
    "existence": ask_existence,
    "count": ask_count,
    "color": ask_color,
    "shape": ask_shape,
    "size": ask_size,
    "size_compare": ask_size_compare,
    "left_right": ask_left_right,
    "above_below": ask_above_below,
    "location": ask_location,
    "closer": ask_closer,
}


def ask_all(scene: Scene, rng: random.Random, policy: TextPolicy) -> list[QA]:
    """One question per category that has an unambiguous question in this scene, in CATEGORIES order."""
    asked = (ASKERS[category](scene, rng, policy) for category in CATEGORIES)
    return [qa for qa in asked if qa is not None]


CORNERS = {"triangle": 3, "square": 4, "diamond": 4}


def ask_vocabulary(rng: random.Random) -> QA:
    """A text-only question about the world's vocabulary (LLaVA mixes some text-only samples into stage 2)."""
    if rng.random() < 0.5:
        shape = rng.choice(sorted(CORNERS))
        return QA("text", f"How many corners does a {shape} have?", str(CORNERS[shape]))
    kinds = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
    kind = rng.choice(sorted(kinds))
    word = rng.choice(kinds[kind])
    return QA("text", f"Is {word} a color, a shape or a size?", kind)


def _present_or_any(rng: random.Random, present: Sequence[str], everything: Sequence) -> object:
    return rng.choice(present) if rng.random() < PRESENT_BIAS else rng.choice(everything)


def _ask_attribute(
    scene: Scene, rng: random.Random, attribute: str, template: str, vocabulary: Sequence[str]
) -> QA | None:
    named = [(i, reference_without(i, scene.objects, attribute)) for i in range(len(scene.objects))]
    named = [(i, text) for i, text in named if text is not None]
    if not named:
        return None
    index, text = rng.choice(named)
    answer = getattr(scene.objects[index], attribute)
    return QA(attribute, template.format(text), answer, tuple(v for v in vocabulary if v != answer), (index,), index)


def _ask_relation(
    scene: Scene,
    rng: random.Random,
    category: str,
    relation: Callable,
    words: tuple[str, str],
    template: str,
) -> QA | None:
    objects = scene.objects
    related = []
    for i in range(len(objects)):
        for j in range(len(objects)):
            if i != j and (word := relation(objects[i], objects[j], scene.canvas)) is not None:
                related.append((i, j, word))
    if not related:
        return None
    i, j, word = rng.choice(related)
    question = template.format(reference(i, objects), reference(j, objects))
    return QA(category, question, word, tuple(w for w in words if w != word), (i, j), i)
