"""benchmarks/paper_scale.py keeps working: `--small` runs every part at tiny sizes on CPU and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_scale.py"
RUNTIMES = ("hf_llava", "hf_llava_compiled", "ours", "ours_static", "ours_compiled")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def numbers(tree, path=""):
    """Every number in a JSON tree with its path (booleans aside)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from numbers(value, f"{path}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_small_run_measures_every_part(tmp_path):
    out = tmp_path / "bench.json"
    # float32: ours and transformers' Llava must then give the very same greedy tokens.
    done = run("--small", "--dtype", "float32", "--projectors", "saep", "mlp2x_gelu", "--reps", "1",
               "--train-steps", "1", "--no-compile", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["settings"]["size"] == "small" and report["settings"]["device"] == "cpu"
    assert list(report["projectors"]) == ["mlp2x_gelu", "saep"]  # the baseline first
    mlp, saep = report["projectors"]["mlp2x_gelu"], report["projectors"]["saep"]
    assert (mlp["tokens"], saep["tokens"]) == (64, 16)  # 8x8 grid; SAEP keeps a quarter

    for entry in (mlp, saep):
        assert set(entry["projector_ms_per_image"]) == {"1", "8"}
        for batch in ("1", "8"):
            ours = entry["inference"][batch]["runs"]["ours"]
            assert len(ours["prefill_times_s"]) == len(ours["generate_times_s"]) == 1
            assert ours["decode_tokens_per_s"] > 0 and ours["prefill_s"] > 0
        assert set(entry["train"]) == {"stage1", "stage2_lora", "stage2_full"}
        train = entry["train"]
        assert train["stage1"]["peak_memory_gib"] is None  # measured on CUDA only
        # Stage 1 trains the projector alone; LoRA adds adapters; full trains the whole LLM besides.
        projector = entry["projector_params"]
        assert train["stage1"]["trainable_params"] == projector
        assert projector < train["stage2_lora"]["trainable_params"] < train["stage2_full"]["trainable_params"]

    for batch in ("1", "8"):
        parity = mlp["inference"][batch]
        assert parity["reference"] == "hf_llava" and parity["runs"]["ours"]["same_greedy_tokens"] is True
        fast = report["fast"][batch]
        assert list(fast["runs"]) == list(RUNTIMES)
        assert all(fast["runs"][name]["same_greedy_tokens"] is True for name in RUNTIMES[1:])
        assert set(fast["speedup_vs_reference"]) == set(RUNTIMES[1:])

    found = dict(numbers({"projectors": report["projectors"], "fast": report["fast"]}))  # the measurements
    assert len(found) > 100
    # Times, rates, sizes, ratios, counts and losses (cross-entropy) are positive and finite; spreads finite, >= 0.
    spreads = {path for path in found if path.endswith("_spread")}
    assert spreads and all(math.isfinite(found[path]) and found[path] >= 0 for path in spreads)
    assert {path: value for path, value in found.items()
            if path not in spreads and not (math.isfinite(value) and value > 0)} == {}

    tables = report["tables"]
    assert "| mlp2x_gelu | 64 |" in tables["inference"] and "| saep | 16 |" in tables["inference"]
    assert "| 8 | ours |" in tables["parity"] and "| 8 | ours_compiled |" in tables["fast"]
    assert "| saep | stage2_lora |" in tables["train"]
    assert "## fast" in done.stdout and "wrote" in done.stdout


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_scale", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args,message",
    [
        (["--projectors", "nope"], "--projectors: unknown ['nope']"),
        (["--projectors", "saep", "--parts", "fast"], "--parts fast compares mlp2x_gelu"),
        (["--reps", "0"], "--train-steps and --reps must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "x.json"
    monkeypatch.setattr(sys, "argv", ["paper_scale.py", "--small", *args, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        load_script(monkeypatch).main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
