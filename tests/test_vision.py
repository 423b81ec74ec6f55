"""The vision tower: built from configs or local folders, grid from the config, exactly the requested layers."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, SiglipVisionModel

from spatial_mllm.model import build_model, image_processor_for
from spatial_mllm.vision import VisionTower
from tiny import tiny_clip, tiny_llama, tiny_siglip, tiny_tokenizer


@pytest.mark.parametrize("image_size,patch,grid", [(48, 4, 12), (56, 4, 14), (54, 2, 27)])
def test_grid_comes_from_the_config(image_size, patch, grid):
    tower = VisionTower.from_config(tiny_siglip(image_size=image_size, patch_size=patch, layers=2))
    assert tower.geometry.grid == grid
    out = tower(torch.randn(1, 3, image_size, image_size), layers=(1,))
    assert out[0].shape == (1, grid * grid, 32)


def test_clip_drops_cls_and_returns_the_requested_hidden_states():
    config = tiny_clip()
    reference = CLIPVisionModel(config).eval()
    tower = VisionTower(reference)
    pixels = torch.randn(2, 3, 48, 48)
    states = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    got = tower(pixels, layers=(1, 3, -2))
    assert len(got) == 3
    torch.testing.assert_close(got[0], states[1][:, 1:])
    torch.testing.assert_close(got[1], states[3][:, 1:])
    torch.testing.assert_close(got[2], states[3][:, 1:])  # -2 of 5 states = block 3 (LLaVA's choice)
    assert tower.geometry.num_layers == 4 and not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        tower(pixels, layers=(9,))


def test_siglip_keeps_every_patch_token():
    model = SiglipVisionModel(tiny_siglip()).eval()
    pixels = torch.randn(1, 3, 48, 48)
    states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(VisionTower(model)(pixels, layers=(3,))[0], states[3])


def test_from_pretrained_reads_full_clip_and_vision_only_folders(tmp_path):
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(vision_config=tiny_clip().to_dict(),
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, vocab_size=50),
                                projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "clip")
    pixels = torch.randn(1, 3, 48, 48)
    expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[3][:, 1:]
    tower = VisionTower.from_pretrained(str(tmp_path / "clip"))
    torch.testing.assert_close(tower(pixels, layers=(3,))[0], expected)
    tower.model.save_pretrained(tmp_path / "vision_only")
    again = VisionTower.from_pretrained(str(tmp_path / "vision_only"))
    torch.testing.assert_close(again(pixels, layers=(3,))[0], expected)
    # A folder without a saved image processor gets one made from its config.
    assert image_processor_for(str(tmp_path / "clip")).crop_size == {"height": 48, "width": 48}


def test_build_model_from_local_folders(tmp_path):
    torch.manual_seed(0)
    SiglipVisionModel(tiny_siglip()).save_pretrained(tmp_path / "vision")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama(vocab_size=56)).save_pretrained(tmp_path / "llm")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "llm")
    model, processor = build_model(str(tmp_path / "vision"), str(tmp_path / "llm"), str(tmp_path / "llm"), "saep")
    assert processor.num_image_tokens == model.num_image_tokens == 36  # 12x12 grid -> 6x6
    assert model.config.image_token_id == len(tokenizer)  # <image> appended to the vocabulary
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer) == 57  # resized for <image>
