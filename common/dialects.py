"""Errors in each caller's own dialect: Ollama ``{"error": "..."}``, OpenAI ``{"error": {...}}``, control API.

Anything that is not one of our own errors is logged with its traceback and reaches the client only as
a fixed "internal server error" message: never a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from common.errors import LlamaControllerError
from common.wire import VERIFY_PATH

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


def describe(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, message, code) for any exception; unexpected ones are logged, not shown."""
    if isinstance(exc, LlamaControllerError):
        return exc.status, exc.message, exc.code
    log.error("unexpected error while handling a request", exc_info=exc)
    return 500, "internal server error", "internal_error"


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}


def openai_error(status: int, message: str, code: str) -> dict[str, Any]:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def control_error(message: str, code: str) -> dict[str, Any]:
    return {"error": message, "code": code}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(status: int, message: str, code: str) -> dict[str, Any]:
    """Anthropic's Messages API error shape (what the ``anthropic`` client parses)."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def speaks_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, status: int, message: str, code: str) -> dict[str, Any]:
    """An error in the dialect of the path it answers: the one place that decides the shape.

    Ollama clients get ``{"error": "..."}``, Anthropic clients Anthropic's shape, OpenAI clients and the
    native passthrough OpenAI's, everything else (control API, health) the control shape."""
    if path == "/" or path.startswith(("/api/", VERIFY_PATH)):
        return ollama_error(message)
    if speaks_anthropic(path):
        return anthropic_error(status, message, code)
    if path.startswith(("/v1/", "/llama/")):
        return openai_error(status, message, code)
    return control_error(message, code)
