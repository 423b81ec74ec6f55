"""The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` for every failure, and the FastAPI
handlers that put FastAPI's and Starlette's own errors (422 validation, 404 route, 405 method) into it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("spatial_mllm.serving")

MAX_MESSAGE_CHARS = 1000  # a 4.5 KB body once produced a 23.6 MB validation error in vLLM: echo little
MAX_ERRORS_LISTED = 5

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    503: "ServiceUnavailableError",
    500: "InternalServerError",
}


class APIError(Exception):
    """A failure to report to the client with this status; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = bounded(message)
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.status, self.message, self.param)


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def envelope(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": bounded(message),
            "type": ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _location(loc: tuple) -> str:
    """("body", "messages", 0, "content") -> "messages.0.content" (the request parameter, as OpenAI names it)."""
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    described = []
    for error in errors[:MAX_ERRORS_LISTED]:
        where = _location(tuple(error.get("loc", ())))
        described.append(bounded(f"{where}: {error.get('msg', 'invalid')}", 200))
    more = len(errors) - MAX_ERRORS_LISTED
    text = "; ".join(described) + (f"; and {more} more" if more > 0 else "")
    param = _location(tuple(errors[0].get("loc", ()))) if errors else None
    return f"invalid request: {text}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}; the server log has the details"))


__all__ = ["APIError", "ERROR_TYPES", "envelope", "error_response", "install_error_handlers", "bounded"]
