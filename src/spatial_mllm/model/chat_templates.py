"""The conversation templates a model can be trained and prompted with, as Jinja chat templates.

A processor carries one of these as its `chat_template` and saves it, so a model folder says how it is prompted.
Each template marks what the assistant must learn to say (its reply and end-of-turn marker) with `{% generation %}`,
which gives training its supervised character spans directly. Message contents are strings (with `<image>`
placeholders, as LLaVA data has them) or lists of parts in transformers' and OpenAI's form (`{"type": "image"}`,
`{"type": "text", "text": ...}`); an image part renders as LLaVA's `<image>\\n` in front of the turn's text.

Names: `vicuna_v1` (LLaVA-1.5 and LLaVA-SP), `plain` (LLaVA stage 1: image tokens, caption, newline) and
`chat_template` (the tokenizer's own template, whatever it is).
"""

from __future__ import annotations

import json

from .configuration import IMAGE_TOKEN

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# A turn's content as text: a string as it is; a list of parts as one "<image>\n" per image part, then the text parts.
_CONTENT_MACRO = (
    "{%- macro content_text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for part in content if part['type'] in ('image', 'image_url') -%}{{- '" + IMAGE_TOKEN + "\\n' -}}{%- endfor -%}"
    "{%- for part in content if part['type'] == 'text' -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}{{- part['text'] -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_V1 = (
    _CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = content_text(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = " + json.dumps(VICUNA_SYSTEM) + " -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + content_text(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + content_text(message['content']) + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('template vicuna_v1: roles after the system message must be user or assistant, "
    "found ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# LLaVA stage 1: only the image placeholders of the user turn are kept, the caption follows with a newline.
PLAIN = (
    "{%- if not messages or messages[0]['role'] != 'user' or messages | length > 2 "
    "or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
    "{{- raise_exception('template plain needs exactly one user turn then one assistant turn, found roles ' "
    "+ (messages | map(attribute='role') | join(', '))) -}}"
    "{%- endif -%}"
    "{%- set content = messages[0]['content'] -%}"
    "{%- if content is string -%}{{- '" + IMAGE_TOKEN + "' * content.count('" + IMAGE_TOKEN + "') -}}"
    "{%- else -%}{%- for part in content if part['type'] in ('image', 'image_url') -%}"
    "{{- '" + IMAGE_TOKEN + "' -}}{%- endfor -%}{%- endif -%}"
    "{%- if messages | length == 2 -%}"
    "{%- generation -%}{{- messages[1]['content'] if messages[1]['content'] is string "
    "else messages[1]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{{- '\\n' -}}{%- endgeneration -%}"
    "{%- endif -%}"
)

TOKENIZER_TEMPLATE = "chat_template"  # the name under which a tokenizer's own chat template is chosen
CHAT_TEMPLATES = {"plain": PLAIN, "vicuna_v1": VICUNA_V1}


def template_names() -> list[str]:
    return sorted([*CHAT_TEMPLATES, TOKENIZER_TEMPLATE])


def resolve_chat_template(name: str, tokenizer=None) -> str:
    """The Jinja text of a template name; `chat_template` takes the tokenizer's own."""
    if name == TOKENIZER_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template {TOKENIZER_TEMPLATE!r} needs a tokenizer with a chat template; this one has none")
        return tokenizer.chat_template
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(template_names())}")
    return CHAT_TEMPLATES[name]


def template_name(chat_template: str | None) -> str:
    """The registered name of a Jinja template, or "custom" for any other (e.g. a tokenizer's own)."""
    for name, text in CHAT_TEMPLATES.items():
        if chat_template == text:
            return name
    return "custom" if chat_template else "none"


__all__ = [
    "CHAT_TEMPLATES",
    "PLAIN",
    "TOKENIZER_TEMPLATE",
    "VICUNA_SYSTEM",
    "VICUNA_V1",
    "resolve_chat_template",
    "template_name",
    "template_names",
]
