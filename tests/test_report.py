"""The comparison report: table rows and numbers, JSON summary, valid PNG plots, clear errors on bad results."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from spatial_mllm.evaluation.metrics import score_answers
from spatial_mllm.evaluation.report import markdown_table, read_runs, write_report

RESULTS = [
    {
        "name": "llava-1.5-mlp",
        "projector": "mlp2x_gelu",
        "visual_tokens": 576,
        "projector_parameters": 21_012_480,
        "latency_ms_per_sample": 123.456,
        "overall": 0.625,
        "categories": {"left_right": 0.75, "count": 0.5},
    },
    {
        "name": "llava-sp",
        "projector": "llava_sp",
        "visual_tokens": 582,
        "projector_parameters": 23_000_000,
        "tokens_per_second": 41.25,
        "overall": 0.7,
        "categories": {"left_right": 0.8, "count": 0.6, "relation": 0.7},
    },
    {
        "name": "saep",
        "projector": "saep",
        "visual_tokens": 144,
        "overall": 0.6,
        "categories": {"left_right": 0.9, "count": 0.3, "relation": 0.6},
        "per_question": [],  # extra keys from score_answers are ignored
    },
]


def test_markdown_table_rows():
    lines = markdown_table(read_runs(RESULTS)).splitlines()
    assert lines[0] == (
        "| Run | Projector | Visual tokens | Projector params | Latency (ms/sample) | Tokens/s | Overall"
        " | count | left_right | relation |"
    )
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| llava-1.5-mlp | mlp2x_gelu | 576 | 21,012,480 | 123.5 | — | 62.5 | 50.0 | 75.0 | — |"
    assert lines[3] == "| llava-sp | llava_sp | 582 | 23,000,000 | — | 41.2 | 70.0 | 60.0 | 80.0 | 70.0 |"
    assert lines[4] == "| saep | saep | 144 | — | — | — | 60.0 | 30.0 | 90.0 | 60.0 |"
    assert len(lines) == 5


def test_write_report_files(tmp_path):
    paths = write_report(RESULTS, tmp_path / "report")
    assert set(paths) == {"markdown", "json", "accuracy_by_category", "accuracy_vs_visual_tokens"}

    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "| llava-sp | llava_sp | 582 | 23,000,000 | — | 41.2 | 70.0 | 60.0 | 80.0 | 70.0 |" in markdown
    assert "Best overall: llava-sp (70.0)." in markdown
    assert "![accuracy per category](accuracy_by_category.png)" in markdown

    summary = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert summary["categories"] == ["count", "left_right", "relation"]
    assert summary["best_overall"] == "llava-sp"
    assert [run["name"] for run in summary["runs"]] == ["llava-1.5-mlp", "llava-sp", "saep"]
    assert summary["runs"][0]["overall"] == 0.625
    assert summary["runs"][0]["categories"] == {"left_right": 0.75, "count": 0.5}
    assert summary["runs"][1]["tokens_per_second"] == 41.25
    assert summary["runs"][2]["projector_parameters"] is None
    assert "per_question" not in summary["runs"][2]

    for key in ("accuracy_by_category", "accuracy_vs_visual_tokens"):
        path = paths[key]
        assert path.parent == tmp_path / "report" and path.suffix == ".png"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            # a blank canvas would be a single colour; bars, points and text are not
            assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 10


def test_report_from_score_answers_output(tmp_path):
    key = [
        {"question_id": 1, "answer": "left", "category": "left_right", "type": "short"},
        {"question_id": 2, "answer": "yes", "category": "existence", "type": "yesno"},
    ]
    answers = [{"question_id": 1, "text": "left"}, {"question_id": 2, "text": "No"}]
    run = {"name": "tiny", "projector": "mlp2x_gelu", "visual_tokens": 16, **score_answers(answers, key)}
    markdown = write_report([run], tmp_path)["markdown"].read_text(encoding="utf-8")
    assert "| tiny | mlp2x_gelu | 16 | — | — | — | 50.0 | 0.0 | 100.0 |" in markdown


def test_image_gain_column_appears_when_a_run_measured_it(tmp_path):
    reliance = {"loss_own_images": 0.6724, "loss_other_images": 0.7327, "gap": 0.0603, "gap_standard_error": 0.0052}
    runs = [{**RESULTS[0], "image_reliance": reliance}, RESULTS[2]]
    lines = markdown_table(read_runs(runs)).splitlines()
    assert lines[0].startswith("| Run | Projector | Visual tokens | Projector params | Latency (ms/sample) | Tokens/s"
                               " | Image gain (nats/token) | Overall |")  # fmt: skip
    assert lines[2] == "| llava-1.5-mlp | mlp2x_gelu | 576 | 21,012,480 | 123.5 | — | 0.0603 ± 0.0052 | 62.5 | 50.0 | 75.0 | — |"
    assert lines[3] == "| saep | saep | 144 | — | — | — | — | 60.0 | 30.0 | 90.0 | 60.0 |"
    paths = write_report(runs, tmp_path)
    assert "0 means the model ignores the image" in paths["markdown"].read_text(encoding="utf-8")
    saved = json.loads(paths["json"].read_text(encoding="utf-8"))["runs"]
    assert (saved[0]["image_gain"], saved[0]["image_gain_se"], saved[1]["image_gain"]) == (0.0603, 0.0052, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"overall": 62.5}, r"result 0, field 'overall': accuracy must lie in \[0, 1\], got 62.5 \(accuracies are"),
        ({"categories": {"count": "high"}}, r"result 0, category 'count': accuracy must be a number"),
        ({"categories": {}}, r"result 0: field 'categories' must be a non-empty object"),
        ({"visual_tokens": 0}, r"result 0: field 'visual_tokens' must be an integer >= 1, got 0"),
        ({"visual_tokens": None}, r"result 0: missing field 'visual_tokens'"),
        ({"latency_ms_per_sample": -1}, r"result 0: field 'latency_ms_per_sample' must be a positive number"),
        ({"name": "llava-sp"}, r"result 1: name 'llava-sp' is used by an earlier result"),
        ({"image_reliance": {"gap": 0.1}}, r"result 0: field 'image_reliance' needs numbers 'gap' and 'gap_standard_e"),
        ({"image_reliance": 0.1}, r"result 0: field 'image_reliance' must be an object"),
    ],
)
def test_bad_results_are_named(tmp_path, change, message):
    results = [{**RESULTS[0], **change}, RESULTS[1]]
    with pytest.raises(ValueError, match=message):
        write_report(results, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no evaluation results"):
        write_report([], tmp_path)
