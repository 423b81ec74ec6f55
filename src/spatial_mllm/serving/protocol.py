"""The OpenAI chat-completions API as vLLM takes it: request and response schemas (they also make FastAPI's
OpenAPI schema, which the fuzz test reads). Unknown request fields are accepted and ignored, as vLLM does; known
features this server lacks are refused by `unsupported_fields`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str = Field(description="a data:image/...;base64,... URL, or http(s) when the server allows the domain")
    detail: str | None = Field(default=None, description="accepted and ignored")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageURL | str = Field(description="an object with `url`, or the URL itself (as Ollama sends it)")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, description="wins over max_tokens")
    max_tokens: int | None = Field(default=None, ge=1, description="deprecated by OpenAI; max_completion_tokens wins")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy (the default here)")
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=8)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past end-of-sequence "
                             "(fixed-length answers, for benchmarks)")


# Fields of the OpenAI API this server does not implement, with the values that ask for nothing (accepted).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
}


def unsupported_fields(request: ChatCompletionRequest) -> list[str]:
    """Names of known-but-unimplemented fields the request actually uses (a neutral value is fine)."""
    extra = request.model_extra or {}
    return [name for name, neutral in NEUTRAL_VALUES.items() if name in extra and extra[name] not in neutral]


# --- responses ---------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spatial-mllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok"]
    running: int = Field(description="sequences being decoded")
    waiting: int = Field(description="requests queued to join the batch")


__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "ErrorResponse",
    "Health",
    "ImagePart",
    "ModelCard",
    "ModelList",
    "TextPart",
    "Usage",
    "unsupported_fields",
]
