"""The contract of vLLM's Transformers modeling backend, checked on a saved folder without vLLM (which cannot be
installed beside a CPU torch), and the folder loaded by transformers' Auto classes in a process that never imports
spatial_mllm itself, as a vLLM worker loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.serving import save_served_model
from spatial_mllm.cli import main
from spatial_mllm.serving import vllm_contract


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_served_model(tmp_path_factory.mktemp("vllm") / "tiny")


@pytest.fixture(scope="module")
def requirements(folder):
    return {r.name: r for r in vllm_contract.check_folder(folder)}


@pytest.mark.parametrize("name", ["composite config", "auto_map", "AutoModel base model", "attention interface",
                                  "get_image_features", "image token count", "text replacement offsets"])
def test_met(requirements, name):
    assert requirements[name].met, requirements[name].detail


def test_auto_classes_load_the_folder_without_importing_spatial_mllm(folder):
    # A fresh interpreter, as a vLLM worker: only transformers, trust_remote_code and the folder's auto_map.
    script = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModel, AutoProcessor\n"
        f"folder = {str(folder)!r}\n"
        "assert 'spatial_mllm' not in sys.modules\n"
        "config = AutoConfig.from_pretrained(folder, trust_remote_code=True)\n"
        "model = AutoModel.from_pretrained(folder, trust_remote_code=True)\n"
        "processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "print(type(config).__name__, type(model).__name__, type(model.language_model).__name__,\n"
        "      model.language_model.get_output_embeddings() is None, type(processor).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["SpatialMLLMConfig", "SpatialMLLMModel", "LlamaModel", "True",
                                     "SpatialMLLMProcessor"]


def test_the_checks_can_fail(folder, monkeypatch):
    from spatial_mllm.model import SpatialMLLMProcessor
    from transformers.processing_utils import MultiModalData

    # A processor that miscounts, and one that reports no offsets, are caught.
    monkeypatch.setattr(SpatialMLLMProcessor, "_get_num_multimodal_tokens",
                        lambda self, image_sizes=None, **kw: MultiModalData(num_image_tokens=[576] * len(image_sizes)))
    monkeypatch.setattr(SpatialMLLMProcessor, "replace_image_token", lambda self, inputs, index, **kw: "<image>")
    found = {r.name: r for r in vllm_contract.check_folder(folder)}
    assert not found["image token count"].met and "counted [576, 576, 576], expanded [144, 144, 144]" in \
        found["image token count"].detail
    assert not found["text replacement offsets"].met


def test_the_command_prints_each_requirement(folder, capsys, tmp_path):
    assert main(["vllm-check", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "met   attention interface: 2 of 2 decoder layers" in out and "met   auto_map" in out
    assert out.strip().endswith("7 of 7 requirements met")
    # A folder whose auto_map names a module it lacks is reported.
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / "spatial_mllm_auto.py").unlink()
    assert main(["vllm-check", "--model", str(copy)]) == 1
    assert "UNMET auto_map: config.json auto_map names spatial_mllm_auto.py, which the folder lacks" in capsys.readouterr().out
