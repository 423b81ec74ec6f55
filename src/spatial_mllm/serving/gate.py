"""ASGI middleware in front of every route: the API key on /v1/* (401), then the body-size cap (413), decided from
Content-Length before anything is read and again while the body streams in, so an oversized upload is never held
in memory. The rest of a refused upload is read and dropped (up to DRAIN_LIMIT) before the 413 goes out: a server
that answers and closes while the client is still sending makes the client's TCP stack see a reset instead of the
answer."""

from __future__ import annotations

import json
import secrets

from .errors import envelope

DRAIN_LIMIT = 256 * 1024 * 1024  # beyond this a refused upload is cut off (the client may then see a reset)


class RequestGate:
    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "missing API key" if not given else "invalid API key"
                return await _reply(send, 401, f"{message}: send `Authorization: Bearer <key>`",
                                    {"www-authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return await _too_large(receive, send, self.max_request_bytes, more=int(declared) <= DRAIN_LIMIT)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_request_bytes:
                return await _too_large(receive, send, self.max_request_bytes, more=more)
            body.append(chunk)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


async def _too_large(receive, send, limit: int, more: bool) -> None:
    drained = 0
    while more and drained <= DRAIN_LIMIT:
        message = await receive()
        drained += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)
    await _reply(send, 413, f"request body is over this server's limit of {limit} bytes (--max-request-bytes)")


async def _reply(send, status: int, message: str, extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps(envelope(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["RequestGate"]
