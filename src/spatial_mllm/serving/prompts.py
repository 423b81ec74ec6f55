"""OpenAI messages -> the model's inputs, through the processor (its chat template, then `processor(...)`), so a
served model is prompted exactly as `model.generate` users prompt it. Cheap checks (roles, image count, stray
`<image>` text) come before any image is decoded."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import torch
from PIL import Image

from .errors import APIError
from .images import load_image
from .protocol import ChatMessage, ImagePart
from .settings import ServerSettings


@dataclass
class PreparedPrompt:
    input_ids: list[int]  # image placeholders already expanded to the projector's tokens
    pixel_values: torch.Tensor | None  # one row per image, in placeholder order
    num_images: int


def _image_url(part: ImagePart) -> str:
    return part.image_url if isinstance(part.image_url, str) else part.image_url.url


def chat_messages(
    messages: list[ChatMessage], settings: ServerSettings, image_token: str
) -> tuple[list[dict], list[Image.Image]]:
    """transformers-style messages (`{"type": "image"}` parts, images returned in order) from OpenAI ones."""
    image_parts: list[tuple[str, ImagePart]] = []
    converted: list[dict] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            _check_text(message.content, image_token, f"messages.{i}.content")
            converted.append({"role": role, "content": message.content})
            continue
        parts: list[dict] = []
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(part, ImagePart):
                if role != "user":
                    raise APIError(400, f"images are accepted in user messages only, not in a {message.role} message",
                                   where)
                image_parts.append((where, part))
                parts.append({"type": "image"})
            else:
                _check_text(part.text, image_token, f"{where}.text")
                parts.append({"type": "text", "text": part.text})
        converted.append({"role": role, "content": parts})
    if len(image_parts) > settings.limit_images:
        raise APIError(
            400, f"At most {settings.limit_images} image(s) may be provided in one prompt; this one has "
            f"{len(image_parts)}", "messages",
        )
    images = [load_image(_image_url(part), settings, f"{where}.image_url") for where, part in image_parts]
    return converted, images


def _check_text(text: str, image_token: str, param: str) -> None:
    if image_token in text:
        raise APIError(400, f"text may not contain {image_token!r}; send images as image_url parts", param)


def prepare_prompt(
    processor, messages: list[ChatMessage], settings: ServerSettings, max_model_len: int
) -> PreparedPrompt:
    """Rendered with the processor's chat template and encoded; 400 when the model cannot take it."""
    converted, images = chat_messages(messages, settings, processor.image_token)
    try:
        prompt = processor.apply_chat_template(converted, add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        raise APIError(400, f"the model's chat template cannot render these messages: {err}", "messages") from None
    try:
        # padding=False: one prompt needs none, and it leaves the shared fast tokenizer's settings untouched,
        # so the generation thread can decode while a request thread encodes.
        inputs = processor(images=images or None, text=[prompt], padding=False, return_tensors="pt")
    except ValueError as err:
        raise APIError(400, f"the processor refused the prompt: {err}", "messages") from None
    input_ids = inputs["input_ids"][0].tolist()
    if len(input_ids) >= max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens; the messages take "
            f"{len(input_ids)} (images included), leaving no room for an answer", "messages",
        )
    return PreparedPrompt(input_ids, inputs.get("pixel_values"), len(images))


__all__ = ["PreparedPrompt", "chat_messages", "prepare_prompt"]
