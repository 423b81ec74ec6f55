"""Does a model tell the scene's objects apart? Attribute questions (the colour, shape or size of one named object)
sort every reply into one of four outcomes:

- right: the named object's value;
- other object: a value another object of the same scene has. The model sees what is in the scene but not which
  object carries it: it fails to bind the attribute to the object it was asked about;
- not in scene: a value of the attribute no object in the scene has (it did not read the scene);
- no value: a reply that names no value of the attribute at all.

Beside them, the scene guess rate: the accuracy of naming one of the scene's values of that attribute at random
(the mean of 1 / distinct values over the questions). A model whose replies are all from the scene, right at the
guess rate, copies without binding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..demo.world.scene import COLORS, SHAPES, SIZES, Scene
from ..evaluation.metrics import KeyItem, read_key_item
from ..evaluation.multiple_choice import OPTION_LETTERS, extract_choice_letter
from ..evaluation.vqa import normalize_vqa_answer

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
OUTCOMES = ("right", "other_object", "not_in_scene", "no_value")


def named_value(text: str, item: KeyItem) -> str:
    """The value a reply (or the key's answer) names: the chosen option's text for a multiple-choice question, the
    normalised text else."""
    if item.type == "mc":
        letter = extract_choice_letter(text, item.options)
        return "" if letter is None else normalize_vqa_answer(item.options[OPTION_LETTERS.index(letter)])
    return normalize_vqa_answer(text)


def binding_outcomes(replies: Mapping[str, str], keys: Iterable[Mapping[str, Any]],
                     scenes: Mapping[str, Scene]) -> dict[str, dict[str, Any]]:
    """Per attribute category (colour, shape, size) asked about in `keys`: the number of questions, the fraction of
    replies with each outcome, and the scene guess rate. `replies`: reply text by question id; `scenes`: the scene
    by image path. Questions without a reply are left out; a key whose image has no scene is an error."""
    tallies: dict[str, dict[str, Any]] = {}
    for key in keys:
        where = f"answer key {key.get('question_id')}"
        item = read_key_item(key, where)
        category = item.category
        if category not in ATTRIBUTE_VALUES or item.question_id not in replies:
            continue
        scene = scenes.get(key.get("image"))
        if scene is None:
            raise ValueError(f"{where}: no scene for image {key.get('image')!r}")
        in_scene = {getattr(obj, category) for obj in scene.objects}
        value = named_value(replies[item.question_id], item)
        right = named_value(item.answer, item)
        if value == right:
            outcome = "right"
        elif value in in_scene:
            outcome = "other_object"
        elif value in ATTRIBUTE_VALUES[category]:
            outcome = "not_in_scene"
        else:
            outcome = "no_value"
        tally = tallies.setdefault(category, {"questions": 0, "guess_sum": 0.0, **{name: 0 for name in OUTCOMES}})
        tally["questions"] += 1
        tally[outcome] += 1
        tally["guess_sum"] += 1 / len(in_scene)
    return {
        category: {
            "questions": tally["questions"],
            **{name: tally[name] / tally["questions"] for name in OUTCOMES},
            "scene_guess_rate": tally["guess_sum"] / tally["questions"],
        }
        for category, tally in sorted(tallies.items())
    }


def mean_outcomes(results: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The outcomes of several runs on the same questions (training seeds), averaged per category."""
    if not results:
        raise ValueError("no binding results to average")
    categories = sorted(set().union(*results))
    averaged = {}
    for category in categories:
        found = [result[category] for result in results if category in result]
        averaged[category] = {"questions": found[0]["questions"], "runs": len(found)} | {
            name: sum(item[name] for item in found) / len(found) for name in (*OUTCOMES, "scene_guess_rate")
        }
    return averaged


def binding_markdown(rows: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A markdown section: per row label (an arm, the text ceiling) and attribute category, the reply outcomes in %
    beside the scene guess rate."""
    lines = [
        "## Binding: do attribute replies name the object asked about?",
        "",
        "Colour, shape and size questions, every reply sorted into: the right value; another object's value in the "
        "same scene (the model reads what is there but not which object carries it); a value no object of the "
        "scene has; no value at all. Scene guess rate: the accuracy of naming one of the scene's values at random. "
        "Right near the guess rate with most replies from the scene means copying without binding.",
        "",
        "| Arm | Category | Questions | Right | Another object's | Not in scene | No value | Scene guess rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, result in rows.items():
        for category, found in result.items():
            cells = [label, category, str(found["questions"]),
                     *(f"{100 * found[name]:.1f}" for name in (*OUTCOMES, "scene_guess_rate"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["ATTRIBUTE_VALUES", "OUTCOMES", "binding_markdown", "binding_outcomes", "mean_outcomes", "named_value"]
