"""The built-in spatial world: determinism, geometry, hold-out, and every answer checked against the scene graph.

The checks below re-derive each answer from the object coordinates in scenes.jsonl with their own code (thirds of
the canvas, centre offsets, Euclidean distances) and their own, looser notion of "clear", on purpose not calling
the generator's helpers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from spatial_mllm.data.commands import register
from spatial_mllm.demo.world import Scene, make_world, render_scene
from spatial_mllm.demo.world.questions import TextPolicy, ask_all
from spatial_mllm.demo.world.records import stage2_record
from spatial_mllm.demo.world.scene import WorldConfig
from spatial_mllm.demo.world.render import png_bytes

SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."
SIZES = ("small", "large")
COUNTS = {"n_train": 24, "n_val": 6, "n_test": 12, "n_holdout": 12}
# Looser than the generator's own margins: a relation the generator states must at least clear these.
CLEAR = 0.1  # fraction of the canvas: centre offsets and distance differences
REGION_CLEAR = 0.03  # fraction of the canvas: centre distance from the thirds lines
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
POINTS = {
    "top left corner": (0, 0),
    "top right corner": (1, 0),
    "bottom left corner": (0, 1),
    "bottom right corner": (1, 1),
    "center of the image": (0.5, 0.5),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    make_world(out, seed=7, progress=False, **COUNTS)
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scenes_by_image(world: Path) -> dict[str, dict]:
    return {s["image"]: s for s in read_jsonl(world / "scenes.jsonl")}


def manifest(world: Path) -> dict:
    return json.loads((world / "world.json").read_text())


# ---------------------------------------------------------------- independent geometry


class Checker:
    """Answers questions about one scene from its raw object records."""

    def __init__(self, scene: dict, vocabulary: dict):
        self.objects = scene["objects"]
        self.w, self.h = scene["width"], scene["height"]
        self.canvas = min(self.w, self.h)
        self.colors = set(vocabulary["colors"])
        self.shapes = set(vocabulary["shapes"])

    def resolve(self, description: str) -> dict:
        """The single object a description such as 'large red circle' or 'red object' names."""
        words = description.split()
        if words[-1] == "object":
            words = words[:-1]
        matches = [o for o in self.objects if all(w in (o["size"], o["color"], o["shape"]) for w in words)]
        assert all(w in SIZES or w in self.colors or w in self.shapes for w in words), description
        assert len(matches) == 1, f"{description!r} names {len(matches)} objects"
        return matches[0]

    def region(self, x: float, y: float) -> str:
        margin = REGION_CLEAR * self.canvas
        for value, side in ((x, self.w), (y, self.h)):
            assert min(abs(value - side / 3), abs(value - 2 * side / 3)) >= margin, "region is not clear"
        col = ["left", "", "right"][min(int(x * 3 // self.w), 2)]
        row = ["top", "", "bottom"][min(int(y * 3 // self.h), 2)]
        return " ".join(p for p in (row, col) if p) or "center"

    def subject(self, question: str) -> dict | None:
        """The one object a question asks about: the first object it names (the reference object of "closer to the
        X"), the only object of the named kind for existence; None for counting or when no single object is meant."""
        if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
            matches = [o for o in self.objects if (o["color"], o["shape"]) == m.groups()]
            return matches[0] if len(matches) == 1 else None
        if question.startswith("How many "):
            return None
        if m := re.fullmatch(r"Which is closer to the (.+), the (.+) or the (.+)\?", question):
            return self.resolve(m.group(2) if m.group(1) in POINTS else m.group(1))
        for pattern in (r"What (?:color|shape) is the (.+)\?", r"Is the (.+) small or large\?",
                        r"Which is (?:larger|smaller), the (.+) or the .+\?", r"Is the (.+) to the left .+",
                        r"Is the (.+) above or below .+", r"Where is the (.+) in the image\?"):  # fmt: skip
            if m := re.fullmatch(pattern, question):
                return self.resolve(m.group(1))
        raise AssertionError(f"unknown question form: {question!r}")

    def thirds(self, obj: dict) -> str:
        """The 3x3 cell of an object's centre, margins ignored (names as in the world's vocabulary)."""
        col = ["left", "", "right"][min(obj["x"] * 3 // self.w, 2)]
        row = ["top", "", "bottom"][min(obj["y"] * 3 // self.h, 2)]
        return " ".join(p for p in (row, col) if p) or "center"

    def horizontal(self, a: dict, b: dict) -> str:
        assert abs(a["x"] - b["x"]) >= CLEAR * self.canvas, "left/right is not clear"
        return "left" if a["x"] < b["x"] else "right"

    def vertical(self, a: dict, b: dict) -> str:
        assert abs(a["y"] - b["y"]) >= CLEAR * self.canvas, "above/below is not clear"
        return "above" if a["y"] < b["y"] else "below"

    def answer(self, question: str) -> tuple[str, str]:
        """(category, answer) for a question stem."""
        if m := re.fullmatch(r"Is there (an?) (\w+) (\w+) in the image\?", question):
            article, color, shape = m.groups()
            assert article == ("an" if color[0] in "aeiou" else "a")
            present = any(o["color"] == color and o["shape"] == shape for o in self.objects)
            return "existence", "yes" if present else "no"
        if m := re.fullmatch(r"How many (.+) are in the image\?", question):
            words = m.group(1).split()
            if words[-1] == "objects":
                words = words[:-1]
            else:
                assert words[-1].endswith("s")
                words[-1] = words[-1][:-1]
            return "count", str(sum(all(w in (o["size"], o["color"], o["shape"]) for w in words) for o in self.objects))
        if m := re.fullmatch(r"What color is the (.+)\?", question):
            assert not set(m.group(1).split()) & self.colors
            return "color", self.resolve(m.group(1))["color"]
        if m := re.fullmatch(r"What shape is the (.+)\?", question):
            assert m.group(1).endswith(" object")
            return "shape", self.resolve(m.group(1))["shape"]
        if m := re.fullmatch(r"Is the (.+) small or large\?", question):
            assert not set(m.group(1).split()) & set(SIZES)
            return "size", self.resolve(m.group(1))["size"]
        if m := re.fullmatch(r"Which is (larger|smaller), the (.+) or the (.+)\?", question):
            a, b = self.resolve(m.group(2)), self.resolve(m.group(3))
            assert a["r"] != b["r"]
            a_wins = (a["r"] > b["r"]) == (m.group(1) == "larger")
            return "size_compare", m.group(2) if a_wins else m.group(3)
        if m := re.fullmatch(r"Is the (.+) to the left or to the right of the (.+)\?", question):
            return "left_right", self.horizontal(self.resolve(m.group(1)), self.resolve(m.group(2)))
        if m := re.fullmatch(r"Is the (.+) above or below the (.+)\?", question):
            return "above_below", self.vertical(self.resolve(m.group(1)), self.resolve(m.group(2)))
        if m := re.fullmatch(r"Where is the (.+) in the image\?", question):
            obj = self.resolve(m.group(1))
            return "location", self.region(obj["x"], obj["y"])
        if m := re.fullmatch(r"Which is closer to the (.+), the (.+) or the (.+)\?", question):
            target, first, second = m.groups()
            if target in POINTS:
                px, py = POINTS[target][0] * self.w, POINTS[target][1] * self.h
            else:
                ref = self.resolve(target)
                px, py = ref["x"], ref["y"]
            a, b = self.resolve(first), self.resolve(second)
            assert a is not b and target not in (first, second)
            da, db = math.hypot(a["x"] - px, a["y"] - py), math.hypot(b["x"] - px, b["y"] - py)
            assert abs(da - db) >= CLEAR * self.canvas, "closer is not clear"
            return "closer", first if da < db else second
        raise AssertionError(f"unknown question form: {question!r}")

    def check_detailed_caption(self, caption: str) -> None:
        sentences = re.split(r"(?<=\.) ", caption)
        m = re.fullmatch(r"There (?:is|are) (\w+) objects?\.", sentences[0])
        assert m and NUMBERS.index(m.group(1)) == len(self.objects), sentences[0]
        mentioned = []
        for sentence in sentences[1:]:
            if m := re.fullmatch(r"A (\w+) (\w+) (\w+) is at the (.+)\.", sentence):
                obj = self.resolve(" ".join(m.groups()[:3]))
                assert self.region(obj["x"], obj["y"]) == m.group(4), sentence
                mentioned.append(m.groups()[:3])
            elif m := re.fullmatch(r"There is a (\w+) (\w+) (\w+)\.", sentence):
                self.resolve(" ".join(m.groups()))
                mentioned.append(m.groups())
            elif m := re.fullmatch(r"The (.+?) is (to the left of|to the right of|above|below) the (.+)\.", sentence):
                a, b = self.resolve(m.group(1)), self.resolve(m.group(3))
                relation = m.group(2).removeprefix("to the ").removesuffix(" of")
                found = self.horizontal(a, b) if relation in ("left", "right") else self.vertical(a, b)
                assert found == relation, sentence
            else:
                raise AssertionError(f"unknown caption sentence: {sentence!r}")
        assert sorted(mentioned) == sorted((o["size"], o["color"], o["shape"]) for o in self.objects)


def parse_posed(text: str) -> tuple[str, list[str], str]:
    """(stem, options, form) of a posed question, checking the LLaVA layout of its suffix and options."""
    lines = text.split("\n")
    if lines[-1] == SHORT:
        assert len(lines) == 2
        return lines[0], [], "short"
    assert lines[-1] == MC, text
    options = lines[1:-1]
    assert 2 <= len(options) <= 4
    parsed = []
    for letter, line in zip("ABCD", options):
        assert line.startswith(f"{letter}. "), line
        parsed.append(line[3:])
    assert len(set(parsed)) == len(parsed)
    return lines[0], parsed, "mc"


def check_posed(checker: Checker, text: str, reply: str) -> str:
    """Checks `reply` to a posed question; returns the category."""
    stem, options, form = parse_posed(text)
    category, truth = checker.answer(stem)
    if form == "short":
        assert reply == truth, f"{stem!r}: got {reply!r}, geometry says {truth!r}"
    else:
        assert reply in "ABCD"[: len(options)]
        assert options["ABCD".index(reply)] == truth, f"{stem!r}: option {reply} is not {truth!r}"
    return category


# ---------------------------------------------------------------- tests


def test_same_seed_gives_identical_files_and_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    make_world(again, seed=7, progress=False, **COUNTS)
    hashes = file_hashes(world)
    assert len([name for name in hashes if name.endswith(".png")]) == sum(COUNTS.values())
    assert file_hashes(again) == hashes

    other = tmp_path / "other"
    make_world(other, seed=8, progress=False, **COUNTS)
    other_hashes = file_hashes(other)
    assert other_hashes.keys() == hashes.keys()
    differing = [name for name in hashes if hashes[name] != other_hashes[name]]
    assert sum(name.endswith(".png") for name in differing) == sum(COUNTS.values())
    assert "scenes.jsonl" in differing and "eval_test_questions.jsonl" in differing


def test_scene_graph_reproduces_the_png_and_matches_its_pixels(world):
    for record in scenes_by_image(world).values():
        stored = (world / record["image"]).read_bytes()
        assert png_bytes(render_scene(Scene.from_dict(record))) == stored
        image = Image.open(world / record["image"]).convert("RGB")
        assert image.size == (record["width"], record["height"]) == (96, 96)
        for obj in record["objects"]:
            pixel = image.getpixel((obj["x"], obj["y"]))
            # Centre pixels carry the object's colour up to the background noise (+-12) and rounding.
            assert max(abs(p - c) for p, c in zip(pixel, obj["rgb"])) <= 14, (record["id"], obj)


def test_objects_do_not_overlap_and_stay_on_the_canvas(world):
    for record in scenes_by_image(world).values():
        objects = record["objects"]
        assert 2 <= len(objects) <= 5
        assert len({(o["size"], o["color"], o["shape"]) for o in objects}) == len(objects)
        for o in objects:
            assert o["bbox"] == [o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"]]
            assert 0 <= o["bbox"][0] and o["bbox"][2] <= record["width"]
            assert 0 <= o["bbox"][1] and o["bbox"][3] <= record["height"]
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                apart_x = a["bbox"][2] < b["bbox"][0] or b["bbox"][2] < a["bbox"][0]
                apart_y = a["bbox"][3] < b["bbox"][1] or b["bbox"][3] < a["bbox"][1]
                assert apart_x or apart_y, (record["id"], a, b)
        radii = {o["size"]: o["r"] for o in objects}
        assert radii.get("small", 0) < radii.get("large", 99)


def test_holdout_combinations_only_in_holdout_scenes_and_never_named_elsewhere(world):
    info = manifest(world)["holdout"]
    pairs = {tuple(p) for p in info["color_shape"]}
    placements = {tuple(p) for p in info["shape_region"]}
    assert pairs and placements

    def held(record: dict) -> list[int]:
        """Indices of objects showing a held-out pair, or a held-out shape whose centre is in its region."""
        found = []
        for index, o in enumerate(record["objects"]):
            if (o["color"], o["shape"]) in pairs:
                found.append(index)
            col = ["left", "", "right"][min(o["x"] * 3 // record["width"], 2)]
            row = ["top", "", "bottom"][min(o["y"] * 3 // record["height"], 2)]
            if (o["shape"], " ".join(p for p in (row, col) if p) or "center") in placements:
                found.append(index)
        return found

    for record in scenes_by_image(world).values():
        if record["split"] == "holdout":
            assert held(record) == [record["holdout"]["object"]], record["id"]
        else:
            assert held(record) == [] and record["holdout"] is None, record["id"]

    names = [f"{color} {shape}" for color, shape in pairs]
    outside = [p for p in world.iterdir() if p.suffix in (".json", ".jsonl") and "holdout" not in p.name]
    outside.remove(world / "world.json")  # the manifest lists the held-out pairs themselves
    for path in outside:
        text = path.read_text()
        assert not [name for name in names if name in text], path.name


def test_every_evaluation_answer_agrees_with_the_geometry(world):
    scenes = scenes_by_image(world)
    info = manifest(world)
    for split in ("val", "test", "holdout"):
        files = info["files"]["splits"][split]
        questions = read_jsonl(world / files["questions"])
        keys = {k["question_id"]: k for k in read_jsonl(world / files["answer_key"])}
        assert len(keys) == len(questions) > 0
        categories, forms, regions = Counter(), Counter(), Counter()
        for q in questions:
            key = keys[q["question_id"]]
            checker = Checker(scenes[q["image"]], info["vocabulary"])
            stem, options, form = parse_posed(q["text"])
            assert (key["question"], key["options"], key["format"]) == (stem, options, form)
            category = check_posed(checker, q["text"], key["answer"])
            assert category == q["category"] == key["category"]
            assert key["group"] == info["categories"][category]
            assert key["answer_text"] == checker.answer(stem)[1]
            subject = checker.subject(stem)
            assert key["region"] == (None if subject is None else checker.thirds(subject)), (stem, key["region"])
            regions[key["region"] is None] += 1
            categories[category] += 1
            forms[form] += 1
        assert dict(categories) == {c: n for c, n in info["question_counts"][split].items() if n}
        if split == "test":
            assert set(categories) == set(info["categories"]), categories
            assert forms["short"] > 0 and forms["mc"] > 0
            assert regions[False] > regions[True] > 0  # most questions are about one object, counting never is
    holdout_keys = read_jsonl(world / info["files"]["splits"]["holdout"]["answer_key"])
    assert any(k["involves_holdout"] for k in holdout_keys)


def test_pope_files_are_balanced_and_correct(world):
    scenes = scenes_by_image(world)
    info = manifest(world)
    for split in ("val", "test", "holdout"):
        for strategy, name in info["files"]["splits"][split]["pope"].items():
            records = read_jsonl(world / name)
            assert records and {r["category"] for r in records} == {strategy}
            assert set(records[0]) == {"question_id", "image", "text", "label", "category"}
            labels = Counter(r["label"] for r in records)
            assert labels["yes"] == labels["no"] > 0 and set(labels) == {"yes", "no"}
            for r in records:
                checker = Checker(scenes[r["image"]], info["vocabulary"])
                assert check_posed(checker, r["text"], r["label"]) == "existence"
                if strategy == "adversarial" and r["label"] == "no":
                    color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in.*", r["text"].split("\n")[0]).groups()
                    assert any(o["color"] == color or o["shape"] == shape for o in checker.objects)
            assert len({r["question_id"] for r in records}) == len(records)


def test_training_conversations_and_captions_agree_with_the_geometry(world):
    scenes = scenes_by_image(world)
    info = manifest(world)
    for split in ("train", "val"):
        files = info["files"]["splits"][split]
        stage1 = json.loads((world / files["stage1"]).read_text())
        assert len(stage1) == info["counts"][split]
        for sample in stage1:
            human, gpt = sample["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].startswith("<image>\n")
            Checker(scenes[sample["image"]], info["vocabulary"]).check_detailed_caption(gpt["value"])

        stage2 = json.loads((world / files["stage2"]).read_text())
        text_only = [s for s in stage2 if "image" not in s]
        assert len(stage2) - len(text_only) == info["counts"][split] and 0 < len(text_only) <= len(stage2) // 10 + 1
        turns = 0
        for sample in stage2:
            messages = sample["conversations"]
            assert [m["from"] for m in messages] == ["human", "gpt"] * (len(messages) // 2)
            placeholders = [m["value"].count("<image>") for m in messages]
            if "image" not in sample:
                assert sum(placeholders) == 0
                for human, gpt in zip(messages[::2], messages[1::2]):
                    check_text_only(human["value"], gpt["value"])
                continue
            assert placeholders == [1] + [0] * (len(messages) - 1) and messages[0]["value"].startswith("<image>\n")
            checker = Checker(scenes[sample["image"]], info["vocabulary"])
            for human, gpt in zip(messages[::2], messages[1::2]):
                question = human["value"].removeprefix("<image>\n")
                if question.startswith("Describe"):
                    checker.check_detailed_caption(gpt["value"])
                else:
                    check_posed(checker, question, gpt["value"])
                turns += 1
        assert turns >= 2 * info["counts"][split]

    for split in ("train", "val", "test", "holdout"):
        for record in read_jsonl(world / info["files"]["splits"][split]["captions"]):
            objects = scenes[record["image"]]["objects"]
            listed = sorted(record["caption"].split(", "))
            assert listed == sorted(f"a {o['size']} {o['color']} {o['shape']}" for o in objects)


def check_text_only(question: str, answer: str) -> None:
    stem, _, _ = parse_posed(question)
    if m := re.fullmatch(r"How many corners does a (\w+) have\?", stem):
        assert answer == {"triangle": "3", "square": "4", "diamond": "4"}[m.group(1)]
    elif m := re.fullmatch(r"Is (\w+) a color, a shape or a size\?", stem):
        word = m.group(1)
        shapes = ("circle", "square", "triangle", "diamond", "star")
        assert answer == ("size" if word in SIZES else "shape" if word in shapes else "color")
    else:
        raise AssertionError(f"unknown text-only question {stem!r}")


def test_manifest_describes_the_folder(world):
    info = manifest(world)
    assert info["seed"] == 7 and info["canvas"] == 96 and info["version"] == 3
    assert info["counts"] == {"train": 24, "val": 6, "test": 12, "holdout": 12}
    assert info["stage2_emphasis"] == {}  # the fixture's world draws every category alike
    assert info["vocabulary"]["sizes"] == {"small": 8, "large": 14}
    listed = {info["files"]["scenes"]}
    for files in info["files"]["splits"].values():
        for value in files.values():
            listed |= set(value.values()) if isinstance(value, dict) else {value}
    on_disk = {p.name for p in world.iterdir() if p.is_file()} - {"world.json"}
    assert listed == on_disk
    assert len(list((world / "images").iterdir())) == sum(info["counts"].values())


def test_cli_make_world_writes_the_files_and_refuses_a_used_folder(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli_world"
    argv = ["data", "make-world", "--out", str(out), "--seed", "1", "--train", "3", "--val", "1", "--test", "2",
            "--holdout", "2", "--canvas", "64", "--max-objects", "3", "--quiet"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    info = manifest(out)
    assert info["counts"] == {"train": 3, "val": 1, "test": 2, "holdout": 2} and info["canvas"] == 64
    assert Image.open(out / "images" / "train_000002.png").size == (64, 64)
    assert len(json.loads((out / "llava_stage2_train.json").read_text())) == 3 + 1  # plus one text-only sample
    assert "world written to" in capsys.readouterr().out

    with pytest.raises(ValueError, match="not empty"):
        args.func(parser.parse_args(argv))
    before = file_hashes(out)
    args = parser.parse_args([*argv, "--overwrite", "--seed", "2"])
    args.func(args)
    assert file_hashes(out) != before and manifest(out)["seed"] == 2

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a world folder"):
        make_world(tmp_path / "notes", n_train=1, n_val=0, n_test=0, n_holdout=0, overwrite=True, progress=False)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_bad_options_are_reported_clearly(tmp_path):
    with pytest.raises(ValueError, match="stage2_emphasis: 'nearer'"):
        make_world(tmp_path / "e", stage2_emphasis={"nearer": 2.0}, progress=False)
    with pytest.raises(ValueError, match="stage2_emphasis: 'closer'"):
        make_world(tmp_path / "f", stage2_emphasis={"closer": 0}, progress=False)
    with pytest.raises(ValueError, match="number of train images"):
        make_world(tmp_path / "a", n_train=-1, progress=False)
    with pytest.raises(ValueError, match="canvas must be at least"):
        make_world(tmp_path / "b", canvas=16, progress=False)
    with pytest.raises(ValueError, match="max_objects"):
        make_world(tmp_path / "c", min_objects=4, max_objects=2, progress=False)


@pytest.mark.parametrize("emphasis", [None, {"closer": 3.0, "size_compare": 2.0}])
def test_stage2_emphasis_draws_the_weighted_categories_more_often(world, emphasis):
    """With the demo's emphasis, stage 2 over-samples "which is closer" (weight 3) and size comparisons (weight 2)
    against the other categories (weight 1); without it every category is drawn alike. Either way 30% of the
    questions that allow it are posed as multiple choice, as in evaluation.
    Counted here from the written conversations of many draws, against the share each category would have if
    every turn were an unweighted draw from the questions the scene allows."""
    config = WorldConfig(canvas=manifest(world)["canvas"])
    scenes = [Scene.from_dict(s) for s in read_jsonl(world / "scenes.jsonl") if s["split"] == "train"]
    policy = TextPolicy.for_split(config, "train", scenes)
    asked, uniform, mc, mc_able = Counter(), Counter(), 0, 0
    for draw in range(40):
        for scene in scenes:
            allowed = ask_all(scene, random.Random(f"allowed-{draw}-{scene.id}"), policy)
            record = stage2_record(scene, random.Random(f"stage2-{draw}-{scene.id}"), policy, emphasis)
            questions = [m["value"].removeprefix("<image>\n") for m in record["conversations"][::2]]
            questions = [q for q in questions if not q.startswith("Describe")]
            for question in questions:
                asked["closer" if question.startswith("Which is closer") else
                      "size_compare" if re.match(r"Which is (larger|smaller),", question) else "other"] += 1
                mc += question.endswith(MC)
            mc_able += sum(1 for q in questions if not q.startswith("Is there"))  # existence: yes / no only
            share = len(questions) / len(allowed)  # each allowed question's chance of being asked, unweighted
            for qa in allowed:
                uniform[qa.category if qa.category in ("closer", "size_compare") else "other"] += share
    if emphasis is None:
        for kind in ("closer", "size_compare", "other"):
            assert asked[kind] == pytest.approx(uniform[kind], rel=0.1)
    else:
        assert asked["closer"] > 1.6 * uniform["closer"]  # measured 1.77x
        assert asked["size_compare"] > 1.3 * uniform["size_compare"]  # measured 1.43x
        assert asked["other"] < uniform["other"]
    assert 0.25 < mc / mc_able < 0.35
