"""Tiny random-init models of real transformers classes, built in memory (no download), shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig

from spatial_mllm.model import build_model

WORDS = (
    "a an the is are of to and in on at left right above below top bottom center red green blue yellow circle "
    "square triangle small large big what where which how many color shape there yes no one two three four "
    "USER ASSISTANT : ? . , A B C D"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_clip(image_size: int = 48, patch_size: int = 4, layers: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )


def tiny_siglip(image_size: int = 48, patch_size: int = 4, layers: int = 4) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )


def tiny_llama(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=1024,
    )


def tiny_qwen2(vocab_size: int = 64) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=1024,
    )


def tiny_model(projector: str = "mlp2x_gelu", vision: str = "clip", llm: str = "llama", seed: int = 0, **options):
    """A (model, processor) pair: tiny ViT (12x12 grid) + tiny LM + the named projector."""
    torch.manual_seed(seed)
    vision_config = tiny_clip() if vision == "clip" else tiny_siglip()
    llm_config = tiny_llama() if llm == "llama" else tiny_qwen2()
    model, processor = build_model(vision_config, llm_config, tiny_tokenizer(), projector, options)
    return model.eval(), processor


def sharpened(model, processor):
    """Redraw the LM's and projector's matrices with a larger spread: at the usual 0.02 a tiny random model says
    nearly the same thing whatever it is shown, and then answers in the wrong order or from the wrong image would
    go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and not name.startswith("model.vision_tower"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model, processor


def save_sharpened_model(folder: Path) -> Path:
    """A sharpened tiny MLP-projector model and its processor saved into `folder`, as evaluation loads them."""
    model, processor = sharpened(*tiny_model("mlp2x_gelu", seed=1))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
