"""Exact conversion of a conversation into input_ids and labels, for one tokenizer and chat template.

The processor owns one `ConversationEncoder`; nothing else builds one. A chat template renders the conversation
into segments, pieces of text that are supervised (what the assistant must learn to say, with its end-of-turn
marker) or not: from the template's `{% generation %}` blocks when it has them (our templates do), else by
incremental rendering (the render of turns [:i] with the generation prompt must be a prefix of the render of turns
[:i+1]; the difference is the supervised reply), which rejects templates that rewrite earlier turns.

Tokenisation is LLaVA's `tokenizer_image_token`: the text is cut at each `<image>`, every piece is tokenised on its
own, and each placeholder becomes `num_image_tokens` image-token ids; BOS once at the start when the tokenizer adds
one (and the text does not already begin with it). Training text, inference prompts and released LLaVA checkpoints
therefore see the same ids. Labels come from the character offsets of the segments. A token that crosses the
boundary between a supervised and an unsupervised segment cannot be labelled exactly, so it is an error, and
`verify_labels` checks independently that the supervised tokens decode to exactly the supervised text: LLaVA's
silent "tokenization mismatch" (every label masked, loss 0) becomes an error that names the record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from .configuration import IMAGE_TOKEN

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    segments: list[Segment]
    pixel_values: torch.Tensor | None = None  # of the conversation's images, when the processor was given them


class TemplateError(ValueError):
    """The template cannot render this conversation, or its output cannot be split into exact supervised spans."""


class LabelMismatchError(ValueError):
    """The supervised tokens do not decode to the supervised text."""


def image_token_id(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """The id of `<image>`, checking that the tokenizer keeps it as one special token."""
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {image_token} token; add it with "
            f"tokenizer.add_special_tokens({{'extra_special_tokens': ['{image_token}']}}) (model building does this)"
        )
    if tokenizer(image_token, add_special_tokens=False)["input_ids"] != [token_id]:
        raise ValueError(f"the tokenizer splits {image_token} into several tokens; it must be a special token")
    return token_id


class ConversationEncoder:
    """Token ids of conversations (training: with labels) and of prompts, for one tokenizer and template."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str,
        num_image_tokens: int,
        image_token: str = IMAGE_TOKEN,
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("exact label masking needs a fast (tokenizers-backed) tokenizer with offset mappings")
        if not chat_template:
            raise ValueError("the processor has no chat template; give one (e.g. 'vicuna_v1') when building it")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = image_token_id(tokenizer, image_token)
        self.has_generation_tags = bool(_GENERATION_TAG.search(chat_template))
        if "eos_token" in chat_template and tokenizer.eos_token is None:
            raise ValueError("the chat template ends assistant turns with the eos token; the tokenizer has none")
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        self._bos = [tokenizer.bos_token_id] if adds_bos else []

    # --- rendering ----------------------------------------------------------------------------------------------
    def render(self, messages: Messages, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The template's text and the character spans of its `{% generation %}` blocks."""
        try:
            texts, spans = render_jinja_template(
                conversations=[list(messages)],
                chat_template=self.chat_template,
                return_assistant_tokens_mask=self.has_generation_tags,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
        except jinja2.TemplateError as err:
            raise TemplateError(f"the chat template rejected the conversation: {err}") from None
        return texts[0], (spans[0] if spans else [])

    def check(self, messages: Messages) -> str | None:
        """Why the template cannot render these messages, or None (no tokenisation: cheap enough for a data scan)."""
        try:
            self.render(messages)
        except TemplateError as err:
            return str(err)
        return None

    def segments(self, messages: Messages, name: str = "conversation") -> list[Segment]:
        """The whole conversation as supervised and unsupervised pieces of text."""
        try:
            if self.has_generation_tags:
                text, spans = self.render(messages)
                return _split(text, spans)
            return self._incremental_segments(messages)
        except TemplateError as err:
            raise TemplateError(f"{name}: {err}") from None

    def _incremental_segments(self, messages: Messages) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)[0]
            with_reply = self.render(messages[: i + 1])[0]
            if not prompt.startswith(done) or not with_reply.startswith(prompt):
                raise TemplateError(
                    f"the tokenizer's chat template is not prefix-stable at turn {i}: rendering more turns changes "
                    "the text of earlier ones, so supervised spans cannot be derived exactly; use template "
                    "'vicuna_v1' or a prefix-stable chat template"
                )
            reply = with_reply[len(prompt):]
            content = message["content"]
            if isinstance(content, str) and content.strip() not in reply:
                raise TemplateError(f"the chat template does not reproduce the assistant text of turn {i} verbatim")
            segments += [Segment(prompt[len(done):], False), Segment(reply, True)]
            done = with_reply
        whole = self.render(messages)[0]
        if not whole.startswith(done):
            raise TemplateError("the tokenizer's chat template is not prefix-stable at the end of the conversation")
        if len(whole) > len(done):
            segments.append(Segment(whole[len(done):], False))
        return segments

    # --- tokenising ---------------------------------------------------------------------------------------------
    def encode(self, messages: Messages, name: str = "conversation") -> EncodedConversation:
        """input_ids and labels of a whole conversation, verified; `name` (e.g. "data.json record 3") is in errors."""
        segments = self.segments(messages, name)
        input_ids, labels = self.tokenize_segments(segments, name)
        verify_labels(self.tokenizer, input_ids, labels, segments, name)
        return EncodedConversation(input_ids, labels, segments)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a rendered prompt (images expanded), tokenised exactly as training tokenises."""
        return self._tokenize([Segment(text, False)], "prompt", add_special_tokens)[0]

    def tokenize_segments(self, segments: Sequence[Segment], name: str) -> tuple[list[int], list[int]]:
        return self._tokenize(segments, name, add_special_tokens=True)

    def _tokenize(
        self, segments: Sequence[Segment], name: str, add_special_tokens: bool
    ) -> tuple[list[int], list[int]]:
        text = "".join(s.text for s in segments)
        supervised = bytearray(len(text))  # per character: 1 inside a supervised segment
        start = 0
        for segment in segments:
            if segment.supervised:
                supervised[start : start + len(segment.text)] = b"\x01" * len(segment.text)
            start += len(segment.text)
        bos_token = self.tokenizer.bos_token
        bos = self._bos if add_special_tokens and not (bos_token and text.startswith(bos_token)) else []
        input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        offset = 0
        for index, piece in enumerate(text.split(self.image_token)):
            if index:
                input_ids += [self.image_token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                offset += len(self.image_token)
            if piece:
                self._label_piece(piece, offset, text, supervised, input_ids, labels, name)
            offset += len(piece)
        return input_ids, labels

    def _label_piece(
        self,
        piece: str,
        offset: int,
        text: str,
        supervised: bytearray,
        input_ids: list[int],
        labels: list[int],
        name: str,
    ) -> None:
        encoding = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        for token_id, (begin, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            begin, end = begin + offset, end + offset
            flags = set(supervised[begin:end]) if end > begin else {supervised[begin] if begin < len(text) else 0}
            if len(flags) > 1:
                raise TemplateError(
                    f"{name}: token {self.tokenizer.convert_ids_to_tokens(token_id)!r} (characters {begin}-{end}: "
                    f"{text[begin:end]!r}) spans the boundary between prompt and reply, so it cannot be labelled "
                    "exactly; this tokenizer and template do not fit together"
                )
            input_ids.append(token_id)
            labels.append(token_id if 1 in flags else IGNORE_INDEX)


def _split(text: str, spans: Sequence[tuple[int, int]]) -> list[Segment]:
    segments: list[Segment] = []
    position = 0
    for begin, end in spans:
        if begin > position:
            segments.append(Segment(text[position:begin], False))
        if end > begin:
            segments.append(Segment(text[begin:end], True))
        position = max(position, end)
    if position < len(text):
        segments.append(Segment(text[position:], False))
    return segments


def verify_labels(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int],
    labels: Sequence[int],
    segments: Sequence[Segment],
    name: str,
) -> None:
    """Check that each run of supervised tokens decodes to exactly the matching run of supervised text.

    Runs are compared after stripping whitespace at their two ends only (decoders differ in whether they restore a
    word's leading space); everything inside, end-of-turn markers included, must match character for character.
    Raises LabelMismatchError naming `name` otherwise, e.g. when every label is masked.
    """
    expected: list[str] = []
    previous_supervised = False
    for segment in segments:
        if segment.supervised and segment.text:
            if previous_supervised:
                expected[-1] += segment.text
            else:
                expected.append(segment.text)
        if segment.text:
            previous_supervised = segment.supervised
    runs: list[list[int]] = []
    inside = False
    for token_id, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            if label != token_id:
                raise LabelMismatchError(f"{name}: label {label} differs from its input token {token_id}")
            if not inside:
                runs.append([])
            runs[-1].append(token_id)
        inside = label != IGNORE_INDEX
    decoded = [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]
    if len(decoded) != len(expected):
        raise LabelMismatchError(
            f"{name}: {len(expected)} supervised spans expected, {len(decoded)} found in the labels "
            f"(expected {[e.strip() for e in expected]}, labels decode to {[d.strip() for d in decoded]})"
        )
    for want, got in zip(expected, decoded):
        if want.strip() != got.strip():
            raise LabelMismatchError(
                f"{name}: supervised tokens decode to {got.strip()!r} but the reply is {want.strip()!r}; the "
                "tokenizer cannot represent this text exactly (unknown tokens or normalisation)"
            )


__all__ = [
    "IGNORE_INDEX",
    "ConversationEncoder",
    "EncodedConversation",
    "LabelMismatchError",
    "Segment",
    "TemplateError",
    "image_token_id",
    "verify_labels",
]
