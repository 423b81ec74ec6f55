"""Conversion between our `mlp2x_gelu` model and transformers' `LlavaForConditionalGeneration` layout.

Both directions are strict: every key is mapped and every shape checked, so a converted model computes the same
logits on either side.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..model import SpatialMLLMConfig, SpatialMLLMForConditionalGeneration
from ..vision.tower import backbone_of

# (our prefix, HF Llava prefix), most specific first.
_PREFIXES = (
    ("model.projector.mlp.0.", "model.multi_modal_projector.linear_1."),
    ("model.projector.mlp.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.model.", "model.vision_tower."),
    ("model.language_model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def _rename(key: str, to_hf: bool) -> str:
    for ours, theirs in _PREFIXES:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        if key.startswith(src):
            return dst + key[len(src):]
    raise ValueError(f"no LLaVA equivalent for weight {key!r}")


def _copy_strict(state: dict[str, torch.Tensor], target: torch.nn.Module, to_hf: bool) -> None:
    renamed = {_rename(k, to_hf): v for k, v in state.items()}
    expected = target.state_dict()
    missing = sorted(set(expected) - set(renamed))
    extra = sorted(set(renamed) - set(expected))
    # Tied output embeddings are stored once; the tie restores them.
    if getattr(target.config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or extra:
        raise ValueError(f"conversion left weights unmatched: missing {missing[:6]}, unexpected {extra[:6]}")
    for key, tensor in renamed.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} vs {tuple(expected[key].shape)}")
    target.load_state_dict(renamed, strict=False)
    target.tie_weights()


def _feature_layer(num_layers: int, layer: int) -> int:
    return layer - (num_layers + 1)  # hidden-state index -> LLaVA's negative index (L-1 -> -2)


def to_hf_llava(model: SpatialMLLMForConditionalGeneration) -> LlavaForConditionalGeneration:
    config = model.config
    if config.projector_type != "mlp2x_gelu":
        raise ValueError(
            f"only mlp2x_gelu models have a LlavaForConditionalGeneration equivalent, this one uses {config.projector_type}"
        )
    geometry = model.vision_tower.geometry
    has_cls = backbone_of(model.vision_tower.config).has_cls_token
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=_feature_layer(geometry.num_layers, model.vision_feature_layers[0]),
        vision_feature_select_strategy="default" if has_cls else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.image_token_id >= config.text_config.vocab_size:
        raise ValueError("LlavaForConditionalGeneration needs the image token inside the LM vocabulary")
    llava = LlavaForConditionalGeneration(llava_config)
    _copy_strict(model.state_dict(), llava, to_hf=True)
    return llava.to(model.dtype).eval()


def from_hf_llava(llava: LlavaForConditionalGeneration) -> SpatialMLLMForConditionalGeneration:
    hf = llava.config
    layer = hf.vision_feature_layer
    num_layers = hf.vision_config.num_hidden_layers
    if not isinstance(layer, int) or layer not in (-2, num_layers - 1):
        raise ValueError(f"vision_feature_layer={layer!r}: only LLaVA's penultimate layer (-2) maps to mlp2x_gelu")
    strategy = "default" if backbone_of(hf.vision_config).has_cls_token else "full"
    if hf.vision_feature_select_strategy != strategy:
        raise ValueError(f"vision_feature_select_strategy={hf.vision_feature_select_strategy!r} is not supported here")
    if not hf.multimodal_projector_bias or hf.projector_hidden_act != "gelu":
        raise ValueError("only the LLaVA-1.5 projector (biases on, exact GELU) maps to mlp2x_gelu")
    config = SpatialMLLMConfig(
        vision_config=hf.vision_config.to_dict(),
        text_config=hf.text_config.to_dict(),
        projector_type="mlp2x_gelu",
        image_token_id=hf.image_token_id,
    )
    model = SpatialMLLMForConditionalGeneration(config)
    _copy_strict(llava.state_dict(), model, to_hf=False)
    return model.to(llava.dtype).eval()


def export_hf_llava(model: SpatialMLLMForConditionalGeneration, out_dir: str | Path, processor=None) -> Path:
    """Writes a folder that `LlavaForConditionalGeneration.from_pretrained` (and vLLM/SGLang) load."""
    out_dir = Path(out_dir)
    to_hf_llava(model).save_pretrained(out_dir)
    if processor is not None:
        processor.tokenizer.save_pretrained(out_dir)
        processor.image_processor.save_pretrained(out_dir)
    return out_dir


def import_hf_llava(path: str | Path) -> SpatialMLLMForConditionalGeneration:
    return from_hf_llava(LlavaForConditionalGeneration.from_pretrained(str(path)))


__all__ = ["export_hf_llava", "from_hf_llava", "import_hf_llava", "to_hf_llava"]
