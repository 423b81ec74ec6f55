"""Official LLaVA-1.5 / LLaVA-SP projector checkpoints load strictly; a wrong variant or shape is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from spatial_mllm.projectors import VisionGeometry, build_projector
from spatial_mllm.weights import export_official_projector, load_official_projector

GEOMETRY = VisionGeometry(width=16, grid=24, num_layers=4)
LLM = 32
SFE = 8  # spatial_width, 512 at paper scale

# Official key names written out by hand from the released checkpoints' layout (spec section 2).
MLP_KEYS = {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
DFI_KEYS = {"model.conv_CM.weight"} | {
    f"model.{role}_projector.{i}.{p}" for role in ("query", "key", "value") for i in (0, 1) for p in ("weight", "bias")
}
OFFICIAL_KEYS = {
    "llava_sp_pooling": MLP_KEYS | DFI_KEYS | {f"model.conv_{s}.1.weight" for s in (4, 8, 12, 16, 20)}
    | {"model.conv_24.weight", "model.conv_linear.1.weight"},
    "llava_sp_cropping": MLP_KEYS | DFI_KEYS | {f"model.conv_{s}.weight" for s in (4, 8, 12, 16, 20, 24)}
    | {"model.conv_linear.1.weight", "model.conv_linear.1.bias"},
    "llava_sp_pooling_nodfi": MLP_KEYS | {f"model.conv_{s}.1.weight" for s in (4, 8, 12, 16, 20)}
    | {"model.conv_24.weight", "model.conv_linear.1.weight"},
    "mlp2x_gelu": MLP_KEYS,
}


def projector(name: str, grid: int = 24):
    options = {"spatial_width": SFE} if name.startswith("llava_sp") else {}
    geometry = VisionGeometry(GEOMETRY.width, grid, GEOMETRY.num_layers)
    return build_projector(name, geometry, LLM, **options)


def official_checkpoint(name: str, seed: int) -> dict[str, torch.Tensor]:
    """An official-format state dict with random values, shaped like the released files, peft prefix included."""
    torch.manual_seed(seed)
    reference = projector(name)
    return {
        "base_model.model." + key: torch.randn_like(reference.state_dict()[ours])
        for key, ours in reference.official_key_map().items()
    }


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_names_are_exactly_the_released_ones(name):
    key_map = projector(name).official_key_map()
    assert set(key_map) == OFFICIAL_KEYS[name]
    assert sorted(key_map.values()) == sorted(projector(name).state_dict()), "every parameter mapped exactly once"


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_checkpoint_loads_every_tensor(tmp_path, name, suffix):
    checkpoint = official_checkpoint(name, seed=1)
    # The LoRA file also holds LLM weights in real releases: those must be ignored, not refused.
    checkpoint["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 2)
    path = tmp_path / f"non_lora_trainables{suffix}"
    torch.save(checkpoint, path) if suffix == ".bin" else save_file(checkpoint, str(path))
    target = projector(name)
    load_official_projector(target, path)
    own = target.state_dict()
    for key, ours in target.official_key_map().items():
        assert torch.equal(own[ours], checkpoint["base_model.model." + key]), key
    # And the round trip back to official names gives the same tensors, without the prefix.
    exported = export_official_projector(target)
    assert all(torch.equal(exported[k], checkpoint["base_model.model." + k]) for k in exported)


def test_wrong_variant_is_refused_with_names():
    cropping = official_checkpoint("llava_sp_cropping", seed=2)
    with pytest.raises(ValueError) as err:
        load_official_projector(projector("llava_sp_pooling"), cropping, name="llava-sp-cropping-lora")
    message = str(err.value)
    assert "llava_sp_cropping" in message and "llava_sp_pooling" in message
    assert "model.conv_4.1.weight" in message  # expected by pooling, missing
    assert "model.conv_4.weight" in message  # present, unexpected
    nodfi = official_checkpoint("llava_sp_pooling_nodfi", seed=3)
    with pytest.raises(ValueError, match="llava_sp_pooling_nodfi"):
        load_official_projector(projector("llava_sp_pooling"), nodfi)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        load_official_projector(projector("llava_sp_cropping"), official_checkpoint("mlp2x_gelu", seed=4))


def test_wrong_shape_is_refused():
    checkpoint = official_checkpoint("llava_sp_pooling", seed=5)
    with pytest.raises(ValueError, match=r"model.conv_4.1.weight has shape .* expects"):
        load_official_projector(projector("llava_sp_pooling", grid=12), checkpoint)


def test_pickles_other_than_tensors_are_not_loaded(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "payload": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_official_projector(projector("mlp2x_gelu"), path)
    with pytest.raises(FileNotFoundError):
        load_official_projector(projector("mlp2x_gelu"), tmp_path / "absent.bin")
