"""SpatialMLLMProcessor: the one path from conversations and images to model inputs.

It carries the conversation template as its `chat_template` (saved with it, so a model folder says how it is
prompted), LLaVA's image transform, and the exact tokenisation of `conversation.py`:
  - `apply_chat_template(messages, add_generation_prompt=True)` (transformers' own) renders a prompt;
  - `processor(images=..., text=...)` turns prompts into input_ids (each `<image>` expanded to the projector's
    tokens, tokenised as LLaVA does), attention_mask and pixel_values;
  - `encode_conversation(messages, images)` gives a whole training conversation's input_ids, exactly masked
    labels and pixel_values;
  - `image_transform` prepares pixels without a tokenizer (feature caching, encoder pretraining).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import MultiModalData

from .chat_templates import CHAT_TEMPLATES, TOKENIZER_TEMPLATE, resolve_chat_template, template_name
from .configuration import IMAGE_TOKEN, RUN_INFO_FILE
from .conversation import ConversationEncoder, EncodedConversation, Messages, Segment
from .image_transform import ImageTransform
from .remote_code import write_module



class SpatialMLLMProcessor(ProcessorMixin):
    """`processor(images=..., text=...)` -> input_ids (each `<image>` expanded), attention_mask, pixel_values.

    chat_template: Jinja text, or a template name (`vicuna_v1`, `plain`, `chat_template` for the tokenizer's own);
    None takes the tokenizer's own template when it has one, else `vicuna_v1`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
        pad_images: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ):
        if num_image_tokens is None or num_image_tokens <= 0:
            raise ValueError("num_image_tokens must be the projector's token count (model.num_image_tokens)")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.pad_images = pad_images
        if tokenizer is not None and image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {image_token} token: add it with add_special_tokens first")
        super().__init__(image_processor, tokenizer, chat_template=_template_text(chat_template, tokenizer))
        self.encoder  # the tokenizer, template and token count must fit together: checked now, not mid-training

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> SpatialMLLMProcessor:
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        legacy = _legacy_template(Path(pretrained_model_name_or_path))
        if legacy is not None:  # saved before processors carried their template: the run recorded its name
            processor.use_template(legacy)
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The tokenizer saves only its init arguments; a padding side set afterwards would be lost on reload, and
        # the reloaded processor would then pad differently from the one that was saved.
        self.tokenizer.init_kwargs["padding_side"] = self.tokenizer.padding_side
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_module(save_directory)  # what auto_map names, for a processor saved on its own
        return saved

    # --- what consumers ask of a processor ----------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def template(self) -> str:
        """The chat template's registered name (`vicuna_v1`, `plain`), or "custom"."""
        return template_name(self.chat_template)

    def use_template(self, name: str) -> None:
        """Switch to a registered template (or `chat_template`, the tokenizer's own), e.g. for a training stage."""
        self.chat_template = resolve_chat_template(name, self.tokenizer)

    @property
    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.image_processor, pad=self.pad_images)

    @property
    def encoder(self) -> ConversationEncoder:
        """The exact tokenisation for the current tokenizer, template and token count (rebuilt if they change)."""
        return self._encoder_for(self.chat_template, self.num_image_tokens)

    def _encoder_for(self, chat_template: str, num_image_tokens: int) -> ConversationEncoder:
        key = (chat_template, num_image_tokens, id(self.tokenizer))
        cache = self.__dict__.setdefault("_encoders", {})
        if key not in cache:
            cache.clear()
            cache[key] = ConversationEncoder(self.tokenizer, chat_template, num_image_tokens, self.image_token)
        return cache[key]

    def apply_chat_template(self, conversation, *args, add_generation_prompt: bool = False, **kwargs):
        """transformers' own, after checking that a prompt for generation ends with a user turn."""
        if add_generation_prompt:
            batch = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
            for messages in batch:
                if not messages or messages[-1]["role"] != "user":
                    raise ValueError("an inference prompt is a conversation that ends with a user turn")
        return super().apply_chat_template(conversation, *args, add_generation_prompt=add_generation_prompt, **kwargs)

    def check_conversation(self, messages: Messages) -> str | None:
        """Why the template cannot render these messages, or None (cheap: no tokenisation)."""
        return self.encoder.check(messages)

    def encode_conversation(
        self, messages: Messages, images: Sequence[Image.Image] | None = None, name: str = "conversation"
    ) -> EncodedConversation:
        """input_ids and labels (the assistant's replies supervised, verified) of a whole conversation; with
        `images` (in placeholder order), their `pixel_values` too."""
        encoded = self.encoder.encode(messages, name)
        return replace(encoded, pixel_values=self.image_transform(list(images))) if images else encoded

    def conversation_segments(self, messages: Messages, name: str = "conversation") -> list[Segment]:
        return self.encoder.segments(messages, name)

    def tokenize_segments(self, segments: Sequence[Segment], name: str = "conversation") -> tuple[list[int], list[int]]:
        """input_ids and labels (supervised segments labelled) of already rendered segments."""
        return self.encoder.tokenize_segments(segments, name)

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
        return_text_replacement_offsets: bool = False,
        return_mm_token_type_ids: bool = False,
        **unused: Any,
    ) -> BatchFeature:
        """return_text_replacement_offsets / return_mm_token_type_ids: where each `<image>` was expanded and which
        ids are image tokens, as vLLM's Transformers backend asks (see `serving/vllm_contract.py`)."""
        if text is None:
            raise ValueError("text is required; put one <image> in it for each image")
        texts = [text] if isinstance(text, str) else list(text)
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images or [])
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(f"the text has {n_placeholders} {self.image_token} placeholder(s) for {len(images)} image(s)")
        rows = [{"input_ids": self.encoder.encode_text(t, add_special_tokens)} for t in texts]
        if padding in (True, "longest") and len({len(row["input_ids"]) for row in rows}) == 1:
            padding = False  # nothing to pad: a tokenizer without a pad token must still work here
        encoded = self.tokenizer.pad(rows, padding=padding, padding_side=padding_side, return_tensors=return_tensors)
        data = dict(encoded)
        if images:
            data["pixel_values"] = self.image_transform(images)
        if return_text_replacement_offsets:
            replacements = [self.replace_image_token({}, index) for index in range(len(images))]
            data["text_replacement_offsets"] = self.get_text_with_replacements(list(texts), replacements)[1]
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids([row["input_ids"] for row in rows])
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    # --- what vLLM's Transformers backend asks of a processor ---------------------------------------------------
    def _get_num_multimodal_tokens(self, image_sizes: Sequence[Sequence[int]] | None = None, **kwargs) -> MultiModalData:
        """Tokens per image: the projector's count whatever the image's size (every image is brought to the ViT's
        input size first), from one row of pixel_values each."""
        count = len(image_sizes or [])
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * count, num_image_patches=[1] * count)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What each `<image>` in a prompt becomes."""
        return self.image_token * self.num_image_tokens

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _template_text(chat_template: str | None, tokenizer) -> str:
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        return own if isinstance(own, str) and own else CHAT_TEMPLATES["vicuna_v1"]
    if chat_template in CHAT_TEMPLATES or chat_template == TOKENIZER_TEMPLATE:
        return resolve_chat_template(chat_template, tokenizer)
    return chat_template


def _legacy_template(folder: Path) -> str | None:
    """The template name a run recorded beside its model before the processor carried it."""
    path = folder / RUN_INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


__all__ = ["SpatialMLLMProcessor"]
