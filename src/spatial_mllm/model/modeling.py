"""The model, in the layout of transformers' Llava: `SpatialMLLMModel` (ViT -> projector -> the LM's decoder, what
`AutoModel` gives and vLLM's Transformers backend wraps) and `SpatialMLLMForConditionalGeneration` (that model plus
the LM's output head, for training and `generate`). Any transformers causal LM (Llama, Qwen2, ...) provides the
decoder and the head.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from ..projectors import Projector, build_projector
from ..vision import VisionTower
from .configuration import SpatialMLLMConfig
from .remote_code import write_module


class SpatialMLLMPreTrainedModel(PreTrainedModel):
    config_class = SpatialMLLMConfig
    config: SpatialMLLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Decode steps (images already in the KV cache) have no data-dependent branch, so generate() may compile them
    # with a static cache (see spatial_mllm.model.generation).
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models initialise themselves (the LM and ViT in their own post_init, projectors in reset_parameters).
        pass

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        write_module(save_directory)  # what config.json's auto_map names


class SpatialMLLMModel(SpatialMLLMPreTrainedModel):
    """ViT -> projector -> decoder, without the output head.

    `input_ids` carry, for each image, `num_image_tokens` consecutive `image_token_id` tokens; the projector's output
    for that image replaces their embeddings. Images come as `pixel_values` (one row per image, in the order the
    images appear in the batch) or, to reuse a frozen ViT's work, as `vision_features` (the hidden states named by
    `vision_feature_layers`, CLS dropped).
    """

    def __init__(
        self,
        config: SpatialMLLMConfig,
        vision_tower: VisionTower | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model` (a decoder, e.g. LlamaModel): pretrained parts to use instead of
        random-init ones (see builder.py)."""
        super().__init__(config)
        self.vision_tower = vision_tower or VisionTower.from_config(config.vision_config)
        self.projector: Projector = build_projector(
            config.projector_type, self.vision_tower.geometry, config.text_config.hidden_size, **config.projector_options
        )
        self.language_model = language_model or AutoModel.from_config(config.text_config)
        # One text config object, the LM's own: what transformers reads from ours (e.g. the attention implementation
        # when generate() builds the padding mask for a static cache) is then what the LM really uses.
        self.config.text_config = self.language_model.config
        # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`: hand it over by its name.
        lm_arguments = inspect.signature(self.language_model.forward).parameters
        self._lm_cache_argument = "cache" if "cache" in lm_arguments else "past_key_values"
        self.post_init()

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    @property
    def vision_feature_layers(self) -> tuple[int, ...]:
        return self.projector.feature_layers

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_vision(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The ViT hidden states the projector reads; cacheable while the tower is frozen."""
        return self.vision_tower(pixel_values, self.vision_feature_layers)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: list[torch.Tensor] | None = None, **kwargs
    ) -> torch.Tensor:
        """(num_images, num_image_tokens, LM width): what replaces each image's placeholder tokens."""
        if vision_features is None:
            vision_features = self.encode_vision(pixel_values)
        dtype = next(self.projector.parameters()).dtype
        return self.projector([f.to(dtype) for f in vision_features])

    def _merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        image_mask = input_ids == self.config.image_token_id
        n_slots, n_images = int(image_mask.sum()), image_features.shape[0]
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"the batch has {n_slots} image tokens but {n_images} image(s) x {self.num_image_tokens} tokens "
                f"({self.config.projector_type}) = {n_images * self.num_image_tokens}: each <image> must be expanded "
                "to the projector's token count (use SpatialMLLMProcessor) and every image must have a placeholder"
            )
        features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's features in place of its placeholder tokens."""
        image_mask = input_ids == self.config.image_token_id
        embeddings = self.get_input_embeddings()
        # The image token may lie outside the LM's vocabulary (as in converted checkpoints): embed a stand-in.
        outside = image_mask & (input_ids >= embeddings.num_embeddings)
        inputs_embeds = embeddings(input_ids.masked_fill(outside, 0))
        if pixel_values is not None or vision_features is not None:
            image_features = self.get_image_features(pixel_values, vision_features)
            return self._merge_image_features(input_ids, inputs_embeds, image_features)
        # A prompt must bring its images; after prefill an image token is text the model produced (read as text).
        # Shapes first: a decode step (one token, a cache) then has no data-dependent branch and compiles whole.
        if (cache is None or input_ids.shape[1] > 1) and bool(image_mask.any()) and (
            cache is None or cache.get_seq_length() == 0
        ):
            raise ValueError("input_ids contain image tokens but no pixel_values or vision_features were given")
        return inputs_embeds

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers 5.x renamed it, as here
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, vision_features, cache)
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{self._lm_cache_argument: cache},
            **kwargs,
        )


class SpatialMLLMForConditionalGeneration(SpatialMLLMPreTrainedModel, GenerationMixin):
    """`SpatialMLLMModel` plus the LM's output head: logits, the next-token loss on `labels` (image positions never
    count), and `generate`."""

    def __init__(
        self,
        config: SpatialMLLMConfig,
        vision_tower: VisionTower | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """`vision_tower` / `language_model` (a causal LM, e.g. LlamaForCausalLM, whose decoder and head are taken):
        pretrained parts to use instead of random-init ones (see builder.py)."""
        super().__init__(config)
        decoder = language_model.get_decoder() if language_model is not None else None
        self.model = SpatialMLLMModel(config, vision_tower, decoder)
        text = self.model.language_model.config
        self.lm_head = (
            language_model.get_output_embeddings()
            if language_model is not None
            else nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        )
        embedding = self.model.get_input_embeddings()
        embedding_name = next(n for n, m in self.model.language_model.named_modules() if m is embedding)
        # The head shares the input embedding when the LM ties them (tie_word_embeddings), under the LM's own name.
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embedding_name}.weight"}
        self.post_init()
        if config.image_token_id is not None:
            # The image token is a placeholder for pixels, never an answer: generation does not emit it.
            suppressed = list(self.generation_config.suppress_tokens or [])
            self.generation_config.suppress_tokens = sorted({*suppressed, config.image_token_id})

    # --- the parts, and what the rest of the toolkit asks of a model ------------------------------------------------
    @property
    def vision_tower(self) -> VisionTower:
        return self.model.vision_tower

    @property
    def projector(self) -> Projector:
        return self.model.projector

    @property
    def language_model(self) -> PreTrainedModel:
        """The LM's decoder (its output head is `lm_head`)."""
        return self.model.language_model

    @property
    def num_image_tokens(self) -> int:
        return self.model.num_image_tokens

    @property
    def vision_feature_layers(self) -> tuple[int, ...]:
        return self.model.vision_feature_layers

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def causal_lm(self) -> PreTrainedModel:
        """The LM as its own causal-LM class, made of this model's decoder and head (shared, not copied): to save
        or export the LLM alone."""
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.config.text_config)
        setattr(lm, lm.base_model_prefix, self.model.language_model)  # e.g. LlamaForCausalLM.model
        lm.set_output_embeddings(self.lm_head)
        return lm

    def encode_vision(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.model.encode_vision(pixel_values)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: list[torch.Tensor] | None = None, **kwargs
    ) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, vision_features)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers 5.x renamed it, as here
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            vision_features=vision_features,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # Images live in the KV cache after prefill (pixel_values is dropped by transformers itself).
            inputs.pop("vision_features", None)
        return inputs


__all__ = ["SpatialMLLMForConditionalGeneration", "SpatialMLLMModel", "SpatialMLLMPreTrainedModel"]
