"""Assembling a model from parts: a vision tower and an LLM (hub names, local folders or configs) plus a projector."""

from __future__ import annotations

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from ..cache import tokenizer_digest
from ..hub import resolve_source
from ..vision.tower import VisionTower, backbone_of, vision_config_of
from .configuration import IMAGE_TOKEN, SpatialMLLMConfig
from .modeling import SpatialMLLMForConditionalGeneration
from .processing import SpatialMLLMProcessor


def image_processor_for(vision: str | PreTrainedConfig):
    """The vision model's own image processor: from its folder when it has one, else made from its config."""
    if isinstance(vision, str):
        try:
            return transformers.AutoImageProcessor.from_pretrained(vision)
        except OSError:
            vision = vision_config_of(transformers.AutoConfig.from_pretrained(vision))
    processor_class = getattr(transformers, backbone_of(vision).image_processor_class)
    side = vision.image_size
    if backbone_of(vision).has_cls_token:  # CLIP: resize the short side, then centre-crop
        return processor_class(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return processor_class(size={"height": side, "width": side})


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # Padding is masked out everywhere; reuse an existing token rather than growing the vocabulary again.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_model(
    vision: str | PreTrainedConfig,
    llm: str | PreTrainedConfig,
    tokenizer: str | PreTrainedTokenizerBase,
    projector_type: str = "mlp2x_gelu",
    projector_options: dict | None = None,
    dtype=None,
    chat_template: str | None = None,
) -> tuple[SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor]:
    """A model and its processor from pretrained (name or folder) or config-built vision tower and LLM; a name that
    is neither a folder, nor cached, nor reachable on the hub is refused at once.

    chat_template: a template name (`vicuna_v1`, `plain`, `chat_template`) or Jinja text; default: the tokenizer's
    own when it has one, else `vicuna_v1`.
    """
    vision = resolve_source(vision, "vision model") if isinstance(vision, str) else vision
    llm = resolve_source(llm, "language model") if isinstance(llm, str) else llm
    tokenizer = resolve_source(tokenizer, "tokenizer") if isinstance(tokenizer, str) else tokenizer
    tower = VisionTower.from_pretrained(vision) if isinstance(vision, str) else VisionTower.from_config(vision)
    lm = (
        AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
        if isinstance(llm, str)
        else AutoModelForCausalLM.from_config(llm)
    )
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = SpatialMLLMConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        projector_type=projector_type,
        projector_options=dict(projector_options or {}),
        image_token_id=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer_digest=tokenizer_digest(tokenizer),
    )
    model = SpatialMLLMForConditionalGeneration(config, vision_tower=tower, language_model=lm)
    if dtype is not None:
        model = model.to(dtype)
    processor = SpatialMLLMProcessor(
        image_processor_for(vision if isinstance(vision, str) else tower.config),
        tokenizer,
        num_image_tokens=model.num_image_tokens,
        chat_template=chat_template,
    )
    return model, processor


__all__ = ["add_image_token", "build_model", "image_processor_for"]
