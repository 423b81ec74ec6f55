"""The contract of vLLM's Transformers modeling backend, checked on a saved folder without vLLM (which cannot be
installed beside a CPU torch). Requirements the folders do not meet yet are strict xfails: when one is met, the
test fails until its mark is removed."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["composite config", "attention interface", "get_image_features",
                                  "image token count", "text replacement offsets"])
def test_met(requirements, name):
    assert requirements[name].met, requirements[name].detail


@pytest.mark.xfail(strict=True, reason="model folders carry no auto_map (and no code for it to name) yet")
def test_auto_map(requirements):
    assert requirements["auto_map"].met, requirements["auto_map"].detail


@pytest.mark.xfail(strict=True, reason="no base model (ViT + projector + decoder, no lm_head) for AutoModel yet")
def test_base_model(requirements):
    assert requirements["AutoModel base model"].met, requirements["AutoModel base model"].detail


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


def test_the_command_prints_each_requirement(folder, capsys):
    assert main(["vllm-check", "--model", str(folder)]) == 1  # two requirements are unmet today
    out = capsys.readouterr().out
    assert "met   attention interface: 2 of 2 decoder layers" in out and "UNMET auto_map" in out
    assert out.strip().endswith("5 of 7 requirements met")
