"""The evaluation runner and `spatial-mllm eval` / `report` on a tiny random model saved to disk.

Answers must not depend on the batch size, broken question lines must be reported with their line and skipped
(or stop the run with --strict), and the scores file must carry what `report` needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from spatial_mllm import cli
from spatial_mllm.evaluation.comparison import compare_runs
from spatial_mllm.evaluation.metrics import score_answers
from spatial_mllm.model.loading import load_for_inference
from spatial_mllm.evaluation.runner import read_questions
from tiny import save_sharpened_model

QUESTIONS = [
    ("what color is the circle ?", "color"),
    ("is the square left of the triangle ?", "left_right"),
    ("how many circle are there ?", "count"),
    ("what shape is at the top ?", "shape"),
    ("is there a red square ?", "existence"),
    ("which is larger ?", "size"),
    ("what color is the small triangle at the bottom ?", "color"),
    ("is the blue circle above the green square ?", "above_below"),
    ("how many objects ?", "count"),
    ("where is the yellow circle ?", "location"),
    ("what is in the center ?", "location"),
]
TEXT_ONLY = {3, 8}  # questions without image
MAX_NEW_TOKENS = "4"
# What differs between two runs of the same model on the same file: timings, names, the batch size.
PER_RUN_FIELDS = ("latency_ms_per_sample", "ms_per_question", "tokens_per_second", "generation", "answers_file", "name")


@pytest.fixture(autouse=True)
def only_eval_commands(monkeypatch):
    # The CLI as users call it, with only the evaluation subcommands registered (the other areas are not needed).
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("spatial_mllm.evaluation.commands",))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_sharpened_model(tmp_path_factory.mktemp("model"))


def write_questions(folder: Path, lines: list[str] | None = None) -> Path:
    """The question JSONL and its PNG images (each a different colour and size, so answers can differ)."""
    (folder / "images").mkdir(exist_ok=True)
    records = []
    for index, (text, category) in enumerate(QUESTIONS):
        record = {"question_id": f"q{index}", "text": text, "category": category}
        if index not in TEXT_ONLY:
            Image.new("RGB", (32 + 4 * index, 40), (23 * index % 256, 200 - 9 * index, 60 + 15 * index)).save(
                folder / "images" / f"{index}.png"
            )
            record["image"] = f"{index}.png"
        records.append(json.dumps(record))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines if lines is not None else records) + "\n", encoding="utf-8")
    return path


def run_eval(model_dir: Path, questions: Path, out: Path, *extra: str) -> int:
    return cli.main(
        ["eval", "--model", str(model_dir), "--questions", str(questions), "--images", str(questions.parent / "images"),
         "--out", str(out), "--max-new-tokens", MAX_NEW_TOKENS, "--quiet", *extra]
    )  # fmt: skip


def read_answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key_from(answers: list[dict], right: set[int]) -> list[dict]:
    """An answer key under which exactly the answers of `right` (question indices) are correct."""
    return [
        {"question_id": a["question_id"], "category": QUESTIONS[i][1], "type": "short",
         "answer": a["text"] if i in right else "zebra"}
        for i, a in enumerate(answers)
    ]  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_batch_size_does_not_change_answers_or_scores(model_dir, tmp_path):
    questions = write_questions(tmp_path)
    assert run_eval(model_dir, questions, tmp_path / "first.jsonl", "--batch-size", "1") == 0
    first = read_answers(tmp_path / "first.jsonl")
    right = {0, 2, 5, 9}
    key = write_jsonl(tmp_path / "key.jsonl", key_from(first, right))

    for batch_size in ("1", "8"):
        out = tmp_path / f"bs{batch_size}.jsonl"
        assert run_eval(model_dir, questions, out, "--batch-size", batch_size, "--answer-key", str(key)) == 0
    one, eight = tmp_path / "bs1.jsonl", tmp_path / "bs8.jsonl"
    assert one.read_bytes() == eight.read_bytes()
    assert one.read_bytes() == (tmp_path / "first.jsonl").read_bytes()
    scores_one = json.loads((tmp_path / "bs1.scores.json").read_text())
    scores_eight = json.loads((tmp_path / "bs8.scores.json").read_text())
    # one question at a time is a latency; batched, the time per question is a throughput and not called latency
    assert scores_one["latency_ms_per_sample"] == scores_one["ms_per_question"] > 0
    assert scores_eight["latency_ms_per_sample"] is None and scores_eight["ms_per_question"] > 0
    for field in PER_RUN_FIELDS:
        scores_one.pop(field), scores_eight.pop(field)
    assert scores_one == scores_eight
    assert scores_one["overall"] == pytest.approx(len(right) / len(QUESTIONS))
    assert scores_one["counts"]["overall"] == {"correct": len(right), "total": len(QUESTIONS)}
    assert scores_one["categories"]["count"] == 0.5  # q2 right, q8 wrong

    # The answers are the model's own greedy answers to each question asked alone, in file order.
    assert [a["question_id"] for a in first] == [f"q{i}" for i in range(len(QUESTIONS))]
    assert len({a["text"] for a in first}) > 1
    model, processor = load_for_inference(model_dir)
    for index in (0, 3):
        text = QUESTIONS[index][0]
        content = text if index in TEXT_ONLY else f"<image>\n{text}"
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [] if index in TEXT_ONLY else [Image.open(questions.parent / "images" / f"{index}.png")]
        inputs = processor(images=images, text=prompt)
        ids, pixel_values = inputs["input_ids"][0].tolist(), inputs.get("pixel_values")
        output = model.generate(
            input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=int(MAX_NEW_TOKENS),
            do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
        expected = processor.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()
        assert first[index]["text"] == expected
        assert first[index]["prompt"] == (text if index in TEXT_ONLY else f"<image>\n{text}")


def broken_question_lines(folder: Path) -> list[str]:
    """Line 3 is not JSON and line 5 names an image that does not exist; the rest are fine."""
    lines = write_questions(folder).read_text(encoding="utf-8").splitlines()
    lines[2] = '{"question_id": "q2", "text": '
    record = json.loads(lines[4])
    lines[4] = json.dumps({**record, "image": "missing.png"})
    return lines


def test_broken_lines_are_reported_with_their_line_and_skipped(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path, broken_question_lines(tmp_path))
    answers_ok = [{"question_id": f"q{i}", "text": "x"} for i in range(len(QUESTIONS))]
    key = write_jsonl(tmp_path / "key.jsonl", key_from(answers_ok, right=set()))

    assert run_eval(model_dir, questions, tmp_path / "answers.jsonl", "--answer-key", str(key)) == 0
    err = capsys.readouterr().err
    assert f"{questions} line 3 field '<line>': not valid JSON" in err
    assert f"{questions} line 5 field 'image': file not found: " in err and "missing.png" in err
    answered = [a["question_id"] for a in read_answers(tmp_path / "answers.jsonl")]
    assert answered == [f"q{i}" for i in range(len(QUESTIONS)) if i not in (2, 4)]
    scores = json.loads((tmp_path / "answers.scores.json").read_text())
    assert scores["answered"] == len(QUESTIONS) - 2
    assert [problem.split(" field")[0] for problem in scores["skipped"]] == [f"{questions} line {n}" for n in (3, 5)]
    assert scores["unscored_questions"] == ["q2", "q4"]
    assert scores["counts"]["overall"] == {"correct": 0, "total": len(QUESTIONS) - 2}


def test_strict_stops_at_the_first_broken_line(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path, broken_question_lines(tmp_path))
    out = tmp_path / "answers.jsonl"
    assert run_eval(model_dir, questions, out, "--strict") == 2
    err = capsys.readouterr().err
    assert f"spatial-mllm eval: error: {questions} line 3 field '<line>': not valid JSON" in err
    assert "line 5" not in err
    assert not out.exists()


def test_read_questions_reports_every_kind_of_problem(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    lines = [
        {"question_id": 1, "text": "fine", "image": "ok.png"},
        {"question_id": 1, "text": "same id again"},
        {"text": "no id"},
        {"question_id": 3, "text": "  "},
        {"question_id": 4, "text": "<image>\nplaceholder in the text", "image": "ok.png"},
        {"question_id": 5, "text": "unreadable", "image": "broken.png"},
        ["not", "an", "object"],
        {"question_id": 7, "text": "text only"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    questions, problems = read_questions(path, tmp_path / "images", strict=False)
    assert [(q.question_id, q.line) for q in questions] == [(1, 1), (7, 8)]
    assert [(p.line, p.field) for p in problems] == [
        (2, "question_id"), (3, "question_id"), (4, "text"), (5, "text"), (6, "image"), (7, "<line>"),
    ]  # fmt: skip
    assert "already used on line 1" in problems[0].message
    assert "not a readable image" in problems[4].message


def test_answer_key_of_another_file_fails_before_generation(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path)
    other_question = {"question_id": "other", "category": "c", "type": "short", "answer": "a"}
    key = write_jsonl(tmp_path / "key.jsonl", [other_question])
    assert run_eval(model_dir, questions, tmp_path / "answers.jsonl", "--answer-key", str(key)) == 2
    assert f"{key}: no entry for {len(QUESTIONS)} questions of the question file" in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()


def test_cli_eval_then_report(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path)
    assert run_eval(model_dir, questions, tmp_path / "plain.jsonl", "--batch-size", "4") == 0
    answers = read_answers(tmp_path / "plain.jsonl")
    key = write_jsonl(tmp_path / "key.jsonl", key_from(answers, right={1, 4, 6}))
    assert run_eval(model_dir, questions, tmp_path / "mlp-a.jsonl", "--answer-key", str(key), "--name", "mlp-a") == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "27.3%" in printed  # 3 of 11

    model, _ = load_for_inference(model_dir)
    scores = json.loads((tmp_path / "mlp-a.scores.json").read_text())
    assert scores["name"] == "mlp-a"
    assert scores["projector"] == "mlp2x_gelu"
    assert scores["visual_tokens"] == model.num_image_tokens == 144
    assert scores["projector_parameters"] == sum(p.numel() for p in model.projector.parameters())
    assert scores["latency_ms_per_sample"] is None  # batch size 8: see ms_per_question
    assert scores["ms_per_question"] > 0 and scores["tokens_per_second"] > 0
    assert scores["generated_tokens"] <= len(QUESTIONS) * int(MAX_NEW_TOKENS)
    assert [row["response"] for row in scores["per_question"]] == [a["text"] for a in answers]
    assert scores["overall"] == pytest.approx(3 / 11)

    # A second run as another projector's eval would write it: also right on questions 0 and 2 (5 of 11).
    better = [{**a, "text": "zebra"} if i in (0, 2) else a for i, a in enumerate(answers)]
    other = {**scores, **score_answers(better, read_answers(key)), "name": "saep-b", "projector": "saep",
             "visual_tokens": 36}  # fmt: skip
    (tmp_path / "saep-b.scores.json").write_text(json.dumps(other))
    report_dir = tmp_path / "report"
    runs = [str(tmp_path / "mlp-a.scores.json"), str(tmp_path / "saep-b.scores.json")]
    assert cli.main(["report", "--runs", *runs, "--out", str(report_dir)]) == 0
    for name in ("report.md", "report.json", "accuracy_by_category.png", "accuracy_vs_visual_tokens.png"):
        assert (report_dir / name).stat().st_size > 0
    summary = json.loads((report_dir / "report.json").read_text())
    assert [arm["name"] for arm in summary["arms"]] == ["mlp-a", "saep-b"]
    assert summary["baseline"] == "mlp-a"  # the mlp2x_gelu run
    # 2 questions only saep-b got right, none only mlp-a: exact McNemar p = 2 * 0.5**2 = 0.5, so no best.
    overall = next(v for v in summary["versus_baseline"] if v["level"] == "overall")
    (test,) = overall["tests"]
    assert (test["only_arm_right"], test["only_reference_right"], test["p_value"]) == (2, 0, 0.5)
    assert overall["verdict"] == "no significant difference" and summary["best_overall"] is None
    for arm, source in zip(summary["arms"], (scores, other)):
        (run,) = arm["runs"]
        for field in ("projector", "visual_tokens", "projector_parameters", "overall", "categories"):
            assert run[field] == source[field]
        assert run["tokens_per_second"] == pytest.approx(scores["tokens_per_second"])
        assert arm["accuracy"]["overall"]["overall"]["total"] == len(QUESTIONS)
    assert "| mlp-a | mlp2x_gelu | baseline | — | 144 |" in (report_dir / "report.md").read_text()
    assert "best overall: — (no best: saep-b has the highest overall accuracy (45.5%)" in capsys.readouterr().out
    # A second report into the same folder needs --overwrite.
    assert cli.main(["report", "--runs", *runs, "--out", str(report_dir)]) == 2
    assert f"{report_dir} already holds a report (report.md" in capsys.readouterr().err
    assert cli.main(["report", "--runs", *runs, "--out", str(report_dir), "--overwrite"]) == 0

    # Without --name a run is named after its folder and the parent: stage folders of two projectors differ.
    stage2 = tmp_path / "saep" / "stage2"
    shutil.copytree(model_dir, stage2)
    assert run_eval(stage2, questions, tmp_path / "default.jsonl", "--answer-key", str(key)) == 0
    assert json.loads((tmp_path / "default.scores.json").read_text())["name"] == "saep/stage2"


def test_report_refuses_runs_that_do_not_compare(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path)
    assert run_eval(model_dir, questions, tmp_path / "plain.jsonl", "--batch-size", "4") == 0
    key = write_jsonl(tmp_path / "key.jsonl", key_from(read_answers(tmp_path / "plain.jsonl"), right={1}))
    assert run_eval(model_dir, questions, tmp_path / "a.jsonl", "--answer-key", str(key), "--name", "a") == 0
    scores = json.loads((tmp_path / "a.scores.json").read_text())
    other_questions = tmp_path / "other.jsonl"
    other_questions.write_text(questions.read_text().replace("what color", "which colour"))
    variants = {
        "pope": ({**scores, "name": "p", "benchmark": "pope"}, "is scored as 'pope' but .*a.scores.json as 'answer_key'"),
        "other": ({**scores, "name": "o", "questions_file": str(other_questions),
                   "questions_sha256": hashlib.sha256(other_questions.read_bytes()).hexdigest()},
                  "answered .*other.jsonl but .*a.scores.json answered .*questions.jsonl, a different question file"),
    }  # fmt: skip
    for label, (variant, message) in variants.items():
        (tmp_path / f"{label}.scores.json").write_text(json.dumps(variant))
        runs = [str(tmp_path / "a.scores.json"), str(tmp_path / f"{label}.scores.json")]
        assert cli.main(["report", "--runs", *runs, "--out", str(tmp_path / "r")]) == 2
        assert re.search(message, capsys.readouterr().err)
    runs = [str(tmp_path / "a.scores.json"), str(tmp_path / "other.scores.json")]
    assert cli.main(["report", "--runs", *runs, "--out", str(tmp_path / "r"), "--mixed-questions"]) == 0
    unscored = tmp_path / "plain.scores.json"  # eval without --answer-key: answers and run facts only
    assert cli.main(["report", "--runs", str(unscored), "--out", str(tmp_path / "r2")]) == 2
    assert "answers without scores (eval ran without --answer-key or --pope)" in capsys.readouterr().err


def test_report_names_the_file_of_a_bad_run(tmp_path, capsys):
    good = {"name": "a", "projector": "mlp2x_gelu", "visual_tokens": 144, "overall": 0.5, "categories": {"c": 0.5},
            "counts": {"overall": {"correct": 1, "total": 2}, "categories": {"c": {"correct": 1, "total": 2}}}}
    (tmp_path / "a.scores.json").write_text(json.dumps(good))
    (tmp_path / "b.scores.json").write_text(json.dumps({**good, "name": "b", "overall": 50}))
    (tmp_path / "c.scores.json").write_text(json.dumps(good))
    paths = [str(tmp_path / f"{name}.scores.json") for name in "abc"]
    assert cli.main(["report", "--runs", paths[0], paths[1], "--out", str(tmp_path / "r")]) == 2
    assert f"{paths[1]}, field 'overall': accuracy must lie in [0, 1], got 50" in capsys.readouterr().err
    assert cli.main(["report", "--runs", paths[0], paths[2], "--out", str(tmp_path / "r")]) == 2
    assert f"{paths[2]}: run name 'a' is also the name in {paths[0]}; names must differ (give each run its own with" \
        in capsys.readouterr().err


def test_eval_on_the_built_in_world(model_dir, tmp_path):
    from spatial_mllm.demo.world import make_world, split_files

    world = tmp_path / "world"
    make_world(world, n_train=0, n_val=1, n_test=0, n_holdout=0, progress=False)
    files = split_files("val")
    questions = world / files["questions"]
    key_lines = (world / files["answer_key"]).read_text().splitlines()
    assert any('"mc"' in line for line in key_lines)  # both question forms are scored
    common = ["eval", "--model", str(model_dir), "--images", str(world), "--max-new-tokens", "2", "--quiet"]
    out = tmp_path / "world.jsonl"
    key = world / files["answer_key"]
    assert cli.main([*common, "--questions", str(questions), "--out", str(out), "--answer-key", str(key)]) == 0
    scores = json.loads(out.with_suffix(".scores.json").read_text())
    assert scores["counts"]["overall"]["total"] == len(key_lines) == len(read_answers(out))
    assert set(scores["types"]) <= {"short", "mc"}
    # scores format 2: each question's group and image region come from the key, for paired tests and region maps
    keys = {record["question_id"]: record for record in map(json.loads, key_lines)}
    assert scores["scores_version"] == 2
    rows = scores["per_question"]
    assert [(row["group"], row["region"]) for row in rows] == [
        (keys[row["question_id"]]["group"], keys[row["question_id"]]["region"]) for row in rows
    ]
    assert any(row["region"] for row in rows) and any(row["region"] is None for row in rows)
    assert compare_runs([scores]).arm(scores["name"]).overall.total == len(key_lines)

    pope_questions = world / files["pope"]["adversarial"]
    pope_out = tmp_path / "pope.jsonl"
    assert cli.main([*common, "--questions", str(pope_questions), "--out", str(pope_out), "--pope"]) == 0
    pope = json.loads(pope_out.with_suffix(".scores.json").read_text())
    labels = [json.loads(line)["label"] for line in pope_questions.read_text().splitlines()]
    assert pope["pope"]["splits"]["adversarial"]["total"] == len(labels)
    assert pope["categories"] == {"adversarial": pope["pope"]["splits"]["adversarial"]["accuracy"]}
    split = pope["pope"]["splits"]["adversarial"]
    found = compare_runs([pope]).arm(pope["name"]).overall  # the report counts POPE through its confusion counts
    assert (found.correct, found.total) == (split["tp"] + split["tn"], len(labels))


def test_a_file_with_nothing_to_answer_is_an_error(model_dir, tmp_path, capsys):
    lines = write_questions(tmp_path).read_text(encoding="utf-8").splitlines()
    questions = write_questions(tmp_path, [line for line in lines if '"image"' in line])  # no --images given
    command = ["eval", "--model", str(model_dir), "--questions", str(questions), "--out", str(tmp_path / "a.jsonl")]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    skipped = len(QUESTIONS) - len(TEXT_ONLY)
    assert f"{questions}: no question can be answered ({skipped} lines skipped; the first: " in err
    assert "line 1 field 'image': the question has an image but no image folder was given" in err


def test_world_answer_keys_grade_letters_and_option_texts(tmp_path):
    from spatial_mllm.demo.world import make_world, split_files
    from spatial_mllm.evaluation.metrics import score_answers

    make_world(tmp_path, n_train=0, n_val=2, n_test=0, n_holdout=0, progress=False)
    key = [json.loads(line) for line in (tmp_path / split_files("val")["answer_key"]).read_text().splitlines()]
    choices = [record for record in key if record["format"] == "mc"]
    assert choices and all(record["answer"] in "ABCD" for record in choices)
    # The world's mc key holds the letter in "answer" and the option text in "answer_text".
    by_letter = [{"question_id": r["question_id"], "text": r["answer"]} for r in key]
    by_text = [{"question_id": r["question_id"], "text": r["answer_text"].capitalize() + "."} for r in key]
    assert score_answers(by_letter, key)["overall"] == 1.0
    assert score_answers(by_text, key)["overall"] == 1.0
    wrong_letter = {r["question_id"]: "ABCD"[("ABCD".index(r["answer"]) + 1) % len(r["options"])] for r in choices}
    shifted = [{"question_id": r["question_id"], "text": wrong_letter.get(r["question_id"], r["answer"])} for r in key]
    scores = score_answers(shifted, key)
    assert scores["counts"]["types"]["mc"] == {"correct": 0, "total": len(choices)}
    assert scores["counts"]["types"]["short"]["correct"] == len(key) - len(choices)
