"""ServerSettings: everything an operator can set on `spatial-mllm serve`, with the limits checked per request."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits are checked before work is done: body size while it is read, an image's bytes from its base64 length,
    its pixels from its header, prompt length before the request is queued."""

    served_model_name: str = "spatial-mllm"
    api_key: str | None = None  # when set, /v1/* requires `Authorization: Bearer <key>`
    max_queue: int = 64  # requests waiting to join the running batch; more are refused with 503
    max_batch_size: int = 16  # sequences decoded together (a request with n=k holds k of them)
    max_request_bytes: int = 20 * MIB
    max_image_bytes: int = 10 * MIB  # one image, decoded
    max_image_pixels: int = 4096 * 4096  # width x height from the image header, before the pixels are decoded
    limit_images: int = 1  # images per request (the whole conversation)
    max_model_len: int | None = None  # prompt + completion tokens; None: the LM's max_position_embeddings
    max_n: int = 8  # choices per request
    # Remote images: off unless domains are listed. Only http(s), only these hosts, no redirects.
    allowed_media_domains: tuple[str, ...] = field(default_factory=tuple)
    media_fetch_timeout_s: float = 5.0
    retry_after_s: int = 1  # sent with 503 when the queue is full

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch_size", "max_request_bytes", "max_image_bytes", "max_image_pixels",
                     "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit_images < 0:
            raise ValueError(f"limit_images must be 0 or more, got {self.limit_images}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


__all__ = ["MIB", "ServerSettings"]
