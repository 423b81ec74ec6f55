"""SpatialMLLMConfig: vision tower + projector + causal LM, fully described by one config."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .remote_code import AUTO_MAP

IMAGE_TOKEN = "<image>"
# Beside a trained model: how it was prompted (template) and named; written last, so it also marks completion.
RUN_INFO_FILE = "spatial_mllm_run.json"


@strict
class SpatialMLLMConfig(PreTrainedConfig):
    """
    vision_config: a CLIP or SigLIP vision config (any square grid).
    text_config: the config of any transformers causal LM (Llama, Qwen2, ...).
    projector_type: a name in `spatial_mllm.projectors.PROJECTORS`; projector_options: its keyword options.
    image_token_id: the id of `<image>` in the tokenizer; each image occupies `num_image_tokens` such tokens.
    tokenizer_digest: digest of the tokenizer the model was built with (vocabulary, special tokens, pipeline), so
    that a folder holding another tokenizer is refused at loading instead of answering garbage.
    """

    model_type = "spatial_mllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    projector_options: dict | None = None
    image_token_id: int | None = None
    tokenizer_digest: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_options is None:
            self.projector_options = {}
        # Where processes that never import spatial_mllm find its classes (see remote_code.py).
        self.auto_map = dict(AUTO_MAP)
        # The LM's own tying decides; the composite config only mirrors it (as LlavaConfig does).
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["IMAGE_TOKEN", "RUN_INFO_FILE", "SpatialMLLMConfig"]
