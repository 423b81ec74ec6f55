"""scripts/gpu_check.sh works before GPU time is spent on it: its --dry-run runs every part on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(out: Path, work: Path, *args: str, budget: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_WORK": str(work), "GPU_CHECK_BUDGET_S": str(budget),
           "PYTHON": str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else "python3"}
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=1500)


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    done = run(out, tmp_path / "work", "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {part["part"]: part["status"] for part in summary["parts"]}
    assert status == {
        "preflight": "ok", "inference": "ok", "train": "ok", "fsdp": "ok", "fast": "ok",
        "qlora": "skipped: not installed (bitsandbytes)", "vllm": "skipped: not installed (vllm)",
    }
    assert summary["dry_run"] is True and summary["environment"]["torch"]
    assert sorted(p.name for p in out.iterdir()) == [
        "fast.json", "gpu_check.log", "inference.json", "summary.json", "train.json"
    ]  # what the device tool brings back: at most 8 files
    fsdp = summary["fsdp"]
    assert [m["step"] for m in fsdp["metrics"]] == [1, 2, 3, 4]  # four optimiser steps
    assert fsdp["load_and_generate"]["has_lora"] is True and fsdp["load_and_generate"]["new_tokens"] >= 1
    inference = json.loads((out / "inference.json").read_text())
    assert list(inference["projectors"]) == ["mlp2x_gelu", "saep"]
    assert "ours_compiled" in json.loads((out / "fast.json").read_text())["fast"]["1"]["runs"]
    assert set(json.loads((out / "train.json").read_text())["projectors"]["saep"]["train"]) == {
        "stage1", "stage2_lora", "stage2_full"
    }


def test_a_part_out_of_time_is_recorded_and_the_rest_still_reported(tmp_path):
    # A budget too small for anything after the preflight: every part is recorded as skipped, none hangs.
    out = tmp_path / "out"
    done = run(out, tmp_path / "work", "--dry-run", "inference", "qlora", budget=1)
    summary = json.loads((out / "summary.json").read_text())
    status = {part["part"]: part["status"] for part in summary["parts"]}
    assert status["preflight"].startswith("skipped: out of time")
    assert done.returncode == 1 and "preflight failed: nothing else runs" in (out / "gpu_check.log").read_text()


def test_unknown_arguments_are_refused():
    done = subprocess.run(["bash", str(SCRIPT), "/tmp/x", "--nope"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown argument '--nope'" in done.stderr


def test_a_scratch_folder_it_did_not_make_is_left_alone(tmp_path):
    work = tmp_path / "precious"
    work.mkdir()
    (work / "data.txt").write_text("keep")
    done = run(tmp_path / "out", work, "--dry-run")
    assert done.returncode == 2 and "exists and was not made by this script" in done.stderr
    assert (work / "data.txt").read_text() == "keep"
