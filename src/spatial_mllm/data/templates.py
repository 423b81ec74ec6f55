"""Conversation templates and the exact conversion of a conversation into input_ids + labels.

A template renders a conversation into segments: pieces of text that are either supervised (what the assistant must
learn to say, with its end-of-turn marker) or not. The same template builds the inference prompt (conversation so
far + the assistant turn opener), so training and generation format text identically.

Tokenisation joins the segments and tokenises the whole text in one pass (as the prompt is tokenised at inference),
then labels each token from the character offsets of the segments. A token that crosses the boundary between a
supervised and an unsupervised segment cannot be labelled exactly, so it is an error, and `verify_labels` checks
independently that the supervised tokens decode to exactly the supervised text. Together they make LLaVA's silent
"tokenization mismatch" (every label masked, loss 0) impossible: a mismatch is an error that names the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import jinja2
from transformers import PreTrainedTokenizerBase

from ..registry import Registry

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


class TemplateError(ValueError):
    """The template cannot render this conversation, or its output cannot be split into exact supervised spans."""


class LabelMismatchError(ValueError):
    """The supervised tokens do not decode to the supervised text."""


class ConversationTemplate:
    """Renders conversations (optional leading system message, then user/assistant turns alternating)."""

    name: str

    def check(self, messages: Sequence[Message]) -> str | None:
        """Why this template cannot render these messages, or None. Cheap; used when a data file is scanned."""
        return None

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        """The whole conversation for training."""
        raise NotImplementedError

    def render_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        """The conversation so far (ending with a user turn) plus the opener of the assistant's reply."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise ValueError if this template cannot work with the tokenizer at all."""


TEMPLATES: Registry[type[ConversationTemplate]] = Registry("conversation template")


def get_template(name: str) -> ConversationTemplate:
    return TEMPLATES.get(name)()


def split_system(messages: Sequence[Message], default: str) -> tuple[str, Sequence[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return default, messages


@TEMPLATES.register("plain")
class PlainTemplate(ConversationTemplate):
    """LLaVA stage 1: image tokens, caption, "\\n". The human text besides its <image> placeholders is dropped."""

    name = "plain"
    separator = "\n"

    def check(self, messages: Sequence[Message]) -> str | None:
        roles = [m.role for m in messages]
        if roles != ["user", "assistant"]:
            return f"template 'plain' needs exactly one human turn then one gpt turn, found roles {roles}"
        return None

    def _image_block(self, user: Message) -> str:
        return IMAGE_TOKEN * user.content.count(IMAGE_TOKEN)

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        user, caption = messages
        return [Segment(self._image_block(user), False), Segment(caption.content + self.separator, True)]

    def render_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        return self._image_block(messages[-1])


@TEMPLATES.register("vicuna_v1")
class VicunaV1Template(ConversationTemplate):
    """`SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`; supervised: " a</s>" of each assistant turn."""

    name = "vicuna_v1"

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token is None:
            raise ValueError("template 'vicuna_v1' ends assistant turns with the eos token; the tokenizer has none")

    def _segments(self, messages: Sequence[Message], eos: str, open_reply: bool) -> list[Segment]:
        system, turns = split_system(messages, VICUNA_SYSTEM)
        segments: list[Segment] = []
        pending = system + " "
        for message in turns:
            if message.role == "user":
                pending += f"USER: {message.content} "
            else:
                segments.append(Segment(pending + "ASSISTANT:", False))
                segments.append(Segment(f" {message.content}{eos}", True))
                pending = ""
        if open_reply:
            pending += "ASSISTANT:"
        if pending:
            segments.append(Segment(pending, False))
        return segments

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        return self._segments(messages, tokenizer.eos_token, open_reply=False)

    def render_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        return "".join(s.text for s in self._segments(messages, tokenizer.eos_token, open_reply=True))


@TEMPLATES.register("chat_template")
class ChatTemplate(ConversationTemplate):
    """The tokenizer's own `apply_chat_template`.

    Supervised spans come from incremental rendering: for the assistant turn i, the render of turns [:i] with the
    generation prompt must be a prefix of the render of turns [:i+1], which must be a prefix of the whole render;
    the difference is the supervised reply (with the template's end-of-turn text). A template that rewrites earlier
    turns (not prefix-stable) is rejected, because its training text would differ from its inference prompts.
    """

    name = "chat_template"

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ValueError("template 'chat_template' needs a tokenizer with a chat template; this one has none")

    def _apply(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation: bool) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
        except jinja2.TemplateError as err:
            raise TemplateError(f"the tokenizer's chat template rejected the conversation: {err}") from None

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self._apply(tokenizer, messages[:i], generation=True)
            with_reply = self._apply(tokenizer, messages[: i + 1], generation=False)
            if not prompt.startswith(done) or not with_reply.startswith(prompt):
                raise TemplateError(
                    f"the tokenizer's chat template is not prefix-stable at turn {i}: rendering more turns changes "
                    "the text of earlier ones, so supervised spans cannot be derived exactly; use template "
                    "'vicuna_v1' or a prefix-stable chat template"
                )
            reply = with_reply[len(prompt):]
            if message.content.strip() not in reply:
                raise TemplateError(f"the chat template does not reproduce the assistant text of turn {i} verbatim")
            segments += [Segment(prompt[len(done):], False), Segment(reply, True)]
            done = with_reply
        whole = self._apply(tokenizer, messages, generation=False)
        if not whole.startswith(done):
            raise TemplateError("the tokenizer's chat template is not prefix-stable at the end of the conversation")
        if len(whole) > len(done):
            segments.append(Segment(whole[len(done):], False))
        return segments

    def render_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        return self._apply(tokenizer, messages, generation=True)


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    segments: list[Segment]


class ConversationEncoder:
    """Turns conversations into token ids (training: with labels; inference: the prompt) for one tokenizer.

    The tokenizer must hold `<image>` as a special token; each `<image>` becomes `num_image_tokens` copies of its id,
    all with label -100. BOS is added once at the start when the tokenizer has one and adds it by default (and the
    rendered text does not already start with it, as some chat templates write it themselves).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | ConversationTemplate, num_image_tokens: int):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("exact label masking needs a fast (tokenizers-backed) tokenizer with offset mappings")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.template.check_tokenizer(tokenizer)
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id(tokenizer)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        self._bos = [tokenizer.bos_token_id] if adds_bos else []

    def encode(self, messages: Sequence[Message], name: str = "conversation") -> EncodedConversation:
        """input_ids and labels of a whole conversation, verified; `name` (e.g. "data.json record 3") is in errors."""
        try:
            segments = self.template.render(messages, self.tokenizer)
        except TemplateError as err:
            raise TemplateError(f"{name}: {err}") from None
        input_ids, labels = self._tokenize(segments, name)
        verify_labels(self.tokenizer, input_ids, labels, segments, name)
        return EncodedConversation(input_ids, labels, segments)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the inference prompt for a conversation that ends with a user turn."""
        if not messages or messages[-1].role != "user":
            raise ValueError("an inference prompt is a conversation that ends with a user turn")
        return self._tokenize([Segment(self.template.render_prompt(messages, self.tokenizer), False)], "prompt")[0]

    def _tokenize(self, segments: list[Segment], name: str) -> tuple[list[int], list[int]]:
        text = "".join(s.text for s in segments)
        supervised = bytearray(len(text))  # per character: 1 inside a supervised segment
        start = 0
        for segment in segments:
            if segment.supervised:
                supervised[start : start + len(segment.text)] = b"\x01" * len(segment.text)
            start += len(segment.text)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bos = [] if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token) else self._bos
        input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for token_id, (begin, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token_id == self.image_token_id:
                input_ids += [token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                continue
            flags = set(supervised[begin:end]) if end > begin else {supervised[begin] if begin < len(text) else 0}
            if len(flags) > 1:
                raise TemplateError(
                    f"{name}: token {self.tokenizer.convert_ids_to_tokens(token_id)!r} (characters {begin}-{end}: "
                    f"{text[begin:end]!r}) spans the boundary between prompt and reply, so it cannot be labelled "
                    "exactly; this tokenizer and template do not fit together"
                )
            input_ids.append(token_id)
            labels.append(token_id if 1 in flags else IGNORE_INDEX)
        return input_ids, labels


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<image>`, checking that the tokenizer keeps it as one special token."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN} token; add it with "
            f"tokenizer.add_special_tokens({{'extra_special_tokens': ['{IMAGE_TOKEN}']}}) (model building does this)"
        )
    if tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] != [token_id]:
        raise ValueError(f"the tokenizer splits {IMAGE_TOKEN} into several tokens; it must be a special token")
    return token_id


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
