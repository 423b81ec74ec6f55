"""The main job end to end: `spatial-mllm demo --quick` trains, evaluates and reports every demo projector."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from spatial_mllm.cli import main
from spatial_mllm.demo import DEMO_PROJECTORS, QUICK
from spatial_mllm.model.loading import load_for_inference

pytestmark = pytest.mark.slow

# Token counts from the quick ViT's grid: one per patch (MLP), six spatial tokens more (LLaVA-SP), a quarter (SAEP).
GRID = QUICK.clip.image_size // QUICK.clip.patch_size
EXPECTED_TOKENS = {
    "mlp2x_gelu": GRID * GRID,
    "llava_sp_pooling": GRID * GRID + 6,
    "llava_sp_cropping": GRID * GRID + 6,
    "saep": (GRID // 2) ** 2,
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def losses(stage_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_report_compares_every_projector(demo_run):
    report = demo_run / "report"
    summary = json.loads((report / "demo.json").read_text())
    runs = {run["name"]: run for run in summary["runs"]}
    assert set(runs) == set(DEMO_PROJECTORS)
    for name, run in runs.items():
        assert run["visual_tokens"] == EXPECTED_TOKENS[name]
        assert run["projector_parameters"] > 0 and run["latency_ms_per_sample"] > 0
        assert run["final_loss_stage2"] == losses(demo_run / name / "stage2")[-1]
        # held-out stage-2 data: the val conversations and descriptions of the quick world (20 + 20 with images)
        reliance = run["image_reliance"]
        assert reliance["samples"] == 2 * QUICK.world["n_val"] and reliance["supervised_tokens"] > reliance["samples"]
        assert reliance["gap"] == pytest.approx(reliance["loss_other_images"] - reliance["loss_own_images"])
        for split in ("test", "holdout"):
            assert 0.0 <= run[split]["overall"] <= 1.0
            assert {"left_right", "above_below", "location", "closer", "count", "existence"} <= set(run[split]["categories"])
    # LLaVA-SP adds six tokens and the spatial convolutions; SAEP cuts the tokens by 75%.
    assert runs["llava_sp_pooling"]["projector_parameters"] > runs["mlp2x_gelu"]["projector_parameters"]
    table = (report / "report.md").read_text()
    assert all(f"| {name} |" in table for name in DEMO_PROJECTORS)
    assert "| Image gain (nats/token) |" in table
    for png in ("accuracy_by_category.png", "accuracy_vs_visual_tokens.png"):
        with Image.open(report / png) as image:
            assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize("name", DEMO_PROJECTORS)
def test_loss_falls_in_both_stages(demo_run, name):
    for stage in ("stage1", "stage2"):
        curve = losses(demo_run / name / stage)
        tail = curve[-len(curve) // 4 :]
        assert sum(tail) / len(tail) < curve[0], f"{name} {stage}: {curve}"
        assert (demo_run / name / stage / "loss.png").is_file()


def test_answers_files_follow_llava_format(demo_run):
    for name in DEMO_PROJECTORS:
        questions = (demo_run / name / "eval" / "test_questions.jsonl").read_text().splitlines()
        answers = [json.loads(line) for line in (demo_run / name / "eval" / "test_answers.jsonl").read_text().splitlines()]
        assert len(answers) == len(questions) > 0
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(answers[0])
        scores = json.loads((demo_run / name / "eval" / "test_answers.scores.json").read_text())
        assert scores["answered"] == len(questions) and scores["visual_tokens"] == EXPECTED_TOKENS[name]


def test_final_folder_loads_and_generates(demo_run):
    model, processor = load_for_inference(demo_run / "saep" / "stage2")
    assert processor.template == "vicuna_v1"  # the folder carries the template stage 2 trained with
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat color is the circle?"}],
                                           add_generation_prompt=True)
    image = next((demo_run / "world" / "images").glob("test_*.png"))
    with Image.open(image) as picture:
        inputs = processor(images=[picture.convert("RGB")], text=prompt)
    ids = inputs["input_ids"]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()
