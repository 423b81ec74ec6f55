"""Binding diagnostics: attribute replies sorted into right / another object's value / absent / no value, against
hand-counted cases, and the LLM diagnosis that reports them."""

from __future__ import annotations

import json

import pytest

from fixtures.training import one_thread  # noqa: F401  (autouse: one torch thread)
from spatial_mllm.cli import main
from spatial_mllm.demo.encoders.shipped import shipped_encoder
from spatial_mllm.demo.world import make_world
from spatial_mllm.demo.world.scene import COLORS, Scene, WorldObject
from spatial_mllm.diagnostics.binding import OUTCOMES, binding_outcomes
from spatial_mllm.diagnostics.diagnose import diagnose_llm


def scene(image: str, *objects: tuple[str, str, str]) -> Scene:
    placed = tuple(WorldObject(shape, color, size, 10 + 25 * k, 40, 8, COLORS[color])
                   for k, (shape, color, size) in enumerate(objects))  # fmt: skip
    return Scene(image.removesuffix(".png"), "test", 96, 96, 40, 1, placed)


SCENES = {
    "a.png": scene("a.png", ("circle", "red", "small"), ("square", "blue", "large"), ("star", "blue", "small")),
    "b.png": scene("b.png", ("circle", "green", "large"), ("triangle", "white", "large")),
}


def key(question_id: str, image: str, category: str, answer: str, options: tuple[str, ...] = ()) -> dict:
    if options:
        letter = "ABCD"[options.index(answer)]
        return {"question_id": question_id, "image": image, "category": category, "format": "mc", "answer": letter,
                "answer_text": answer, "options": list(options)}
    return {"question_id": question_id, "image": image, "category": category, "format": "short", "answer": answer,
            "answer_text": answer}


KEYS = [
    key("q1", "a.png", "color", "red"),  # right
    key("q2", "a.png", "color", "red"),  # blue: another object's colour
    key("q3", "a.png", "color", "red", ("yellow", "red", "blue", "green")),  # C = blue: another object's
    key("q4", "b.png", "color", "green"),  # purple: no object is purple
    key("q5", "b.png", "shape", "triangle"),  # "a dog": no shape at all
    key("q6", "b.png", "shape", "triangle", ("circle", "triangle")),  # B: right
    key("q7", "a.png", "size", "large"),  # small: another object's
    key("q8", "a.png", "count", "3"),  # not an attribute question: left out
    key("q9", "b.png", "color", "white"),  # no reply: left out
]
REPLIES = {"q1": "Red.", "q2": "blue", "q3": "C", "q4": "purple", "q5": "a dog", "q6": "B", "q7": "small", "q8": "3"}


def test_binding_outcomes_against_hand_counts():
    found = binding_outcomes(REPLIES, KEYS, SCENES)
    assert list(found) == ["color", "shape", "size"]
    color = found["color"]
    assert color["questions"] == 4
    assert (color["right"], color["other_object"], color["not_in_scene"], color["no_value"]) == (0.25, 0.5, 0.25, 0)
    # distinct colours: scene a {red, blue} -> 1/2 (three questions), scene b {green, white} -> 1/2
    assert color["scene_guess_rate"] == pytest.approx(0.5)
    shape = found["shape"]
    assert (shape["questions"], shape["right"], shape["no_value"]) == (2, 0.5, 0.5)
    assert shape["scene_guess_rate"] == pytest.approx(0.5)
    size = found["size"]
    assert (size["questions"], size["other_object"], size["scene_guess_rate"]) == (1, 1.0, 0.5)
    for outcomes in found.values():
        assert sum(outcomes[name] for name in OUTCOMES) == pytest.approx(1.0)


def test_binding_outcomes_refuse_a_question_without_its_scene():
    with pytest.raises(ValueError, match="answer key q1: no scene for image 'a.png'"):
        binding_outcomes(REPLIES, KEYS[:1], {"b.png": SCENES["b.png"]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, seed=5, n_train=4, n_val=4, n_test=30, n_holdout=4, progress=False, overwrite=True)
    return out


def test_llm_diagnosis_reports_binding_beside_accuracy(world, tmp_path, capsys):
    """The shipped LLM on unseen scenes reads its attribute replies off the object the question names (measured on
    the demo world: shape 72.7% right against a 40.9% guess rate; the LLM trained without the copy warm-up stayed at
    the guess rate). Its 'right' fraction is the accuracy the scoring gives the same replies."""
    found = diagnose_llm(shipped_encoder("llm"), world, images=30)
    binding = found["binding"]
    assert set(binding) == {"color", "shape", "size"}
    for category, outcomes in binding.items():
        assert outcomes["right"] == pytest.approx(found["with_description"]["categories"][category])
        assert outcomes["questions"] == found["with_description"]["counts"]["categories"][category]["total"]
        assert 1 / 5 <= outcomes["scene_guess_rate"] <= 1  # at most 5 objects, at least one value
    shape, color = binding["shape"], binding["color"]
    for bound in (shape, binding["size"]):  # it binds: well above naming any of the scene's values
        assert bound["right"] > bound["scene_guess_rate"] + 0.15
    assert color["right"] + color["other_object"] > 0.8  # it reads the scene's colours
    assert found["without_description"]["categories"]["color"] < color["right"] - 0.2
    # by question format: short answers and multiple choice partition the questions
    counts = found["with_description"]["counts"]
    assert set(found["with_description"]["types"]) == {"short", "mc"}
    assert sum(tally["total"] for tally in counts["types"].values()) == counts["overall"]["total"]
    assert sum(tally["correct"] for tally in counts["types"].values()) == counts["overall"]["correct"]

    # the scene as the grid cells the LLM was also pretrained on, in place of the image (measured on 100 test images:
    # 80.6% and 78.2% from 8x8 and 4x4 cells, 80.7% from the description, 37.8% without)
    without = found["without_description"]["overall"]
    for side in (8, 4):
        assert found[f"with_grid{side}"]["overall"] > without + 0.25
        assert found[f"with_grid{side}"]["counts"]["overall"]["total"] == counts["overall"]["total"]

    out = tmp_path / "llm.json"
    assert main(["diagnose", "--world", str(world), "--llm", str(shipped_encoder("llm")), "--images", "30",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scene guess rate" in printed and "other" in printed
    grid8 = found["with_grid8"]["overall"]
    assert f" {found['with_description']['overall']:>17.1%} {without:>8.1%} {grid8:>8.1%}" in printed  # overall row
    mc = found["with_description"]["types"]["mc"]
    assert f"{'format mc':>14} {mc:>17.1%}" in printed
    assert json.loads(out.read_text())["llm"]["binding"]["color"]["questions"] == color["questions"]
