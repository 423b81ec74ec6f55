"""Server-sent events as the OpenAI API streams them: `data: <compact JSON>\n\n` per event, `data: [DONE]\n\n` last."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


__all__ = ["DONE", "MEDIA_TYPE", "event"]
