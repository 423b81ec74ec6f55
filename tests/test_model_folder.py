"""A model folder with a missing or broken file is refused with a message naming that file, by every command that
loads one (eval, image-reliance, merge, training's stage.init_from), never with a traceback from the loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spatial_mllm import cli
from spatial_mllm.model.loading import load_for_inference
from spatial_mllm.model.folder import WEIGHTS_FILE, WEIGHTS_INDEX, check_model_folder
from tiny import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_a_saved_model_passes_and_loads(saved):
    assert check_model_folder(saved) == saved
    model, processor = load_for_inference(saved)
    assert model.num_image_tokens == processor.num_image_tokens == 144


def test_missing_folder_and_config(tmp_path, copy):
    with pytest.raises(FileNotFoundError, match=r"stage.init_from .*nowhere: no such folder"):
        check_model_folder(tmp_path / "nowhere", "stage.init_from")
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy: not a model folder \(no config.json\)"):
        check_model_folder(copy)


def test_broken_config(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"copy/config.json: not valid JSON"):
        check_model_folder(copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama', not 'spatial_mllm'; this folder was not"):
        check_model_folder(copy)


def test_missing_and_truncated_weights(copy):
    weights = copy / WEIGHTS_FILE
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file .*copied completely"):
        check_model_folder(copy)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"copy: no weights \(model.safetensors or model.safetensors.index"):
        check_model_folder(copy)
    (copy / WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002.safetensors: missing, though .*index.json lists"):
        check_model_folder(copy)


@pytest.mark.parametrize("command", ["eval", "image-reliance", "merge"])
def test_commands_name_the_missing_weights(copy, tmp_path, capsys, command):
    (copy / WEIGHTS_FILE).unlink()
    (tmp_path / "q.jsonl").write_text("")
    arguments = {
        "eval": ["--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "a.jsonl")],
        "image-reliance": ["--data", str(tmp_path / "d.json"), "--images", str(tmp_path)],
        "merge": ["--out", str(tmp_path / "merged")],
    }[command]
    if command == "image-reliance":
        (tmp_path / "d.json").write_text("[]")
    if command == "eval":  # eval reads the question file first: give it one answerable line
        (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "text": "what ?"}) + "\n")
    assert cli.main([command, "--model", str(copy), *arguments]) == 2
    error = capsys.readouterr().err
    assert f"spatial-mllm {command}: error: model folder {copy}: no weights (model.safetensors" in error
    assert "Traceback" not in error
