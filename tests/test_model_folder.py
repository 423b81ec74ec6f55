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


def test_a_folder_of_the_earlier_weight_layout_loads_the_same_model(saved, tmp_path):
    """Folders saved before the model took transformers' Llava layout (vision_tower.*, projector.*,
    language_model.model.*, language_model.lm_head.*), a LoRA adapter named that way too, still load, strictly."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from spatial_mllm.model.adapter import attach_adapter_weights

    new_to_old = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                  ("model.projector.", "projector."), ("model.vision_tower.", "vision_tower."))

    def old_name(key: str) -> str:
        for new, old in new_to_old:
            if key.startswith(new):
                return old + key[len(new):]
        raise AssertionError(key)

    folder = Path(shutil.copytree(saved, tmp_path / "old"))
    save_file({old_name(k): v for k, v in load_file(folder / WEIGHTS_FILE).items()}, folder / WEIGHTS_FILE,
              metadata={"format": "pt"})
    # A LoRA adapter as the earlier layout saved it: keys and target pattern under language_model.model.
    reference, _ = load_for_inference(saved)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r"model\.language_model\.(.*\.)?(q_proj|v_proj)")
    weights = {}
    generator = torch.Generator().manual_seed(0)
    for name, module in reference.named_modules():
        if name.endswith(("q_proj", "v_proj")) and name.startswith("model.language_model."):
            weights[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
            weights[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    attach_adapter_weights(reference, config, weights, "test adapter")
    (folder / "adapter_config.json").write_text(json.dumps({
        **config.to_dict(), "target_modules": r"language_model\.(.*\.)?(q_proj|v_proj)", "peft_type": "LORA"}))
    save_file({"base_model.model." + old_name(k): v for k, v in weights.items()}, folder / "adapter_model.safetensors")

    model, _ = load_for_inference(folder)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, rtol=0, atol=0)
