"""Small pieces shared by the Ollama handlers: JSON out, llama-server's error messages in."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common import notes
from common.asgi import compact_json
from common.upstream import Upstream

encode = compact_json


def json_or_error(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return {"error": {"message": "the model's backend sent an unreadable answer"}}


def upstream_error_message(payload: bytes) -> str:
    """The message of llama-server's error body (OpenAI shape), or the body itself, shortened."""
    try:
        error = json.loads(payload).get("error")
    except (json.JSONDecodeError, AttributeError):
        return payload.decode("utf-8", "replace")[:500] or "the model's backend refused the request"
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


async def post_json(upstream: Upstream, url: str, body: Any, headers: Mapping[str, str]) -> tuple[int, bytes]:
    """One small JSON request, answer read whole: (status, body)."""
    notes.note_backend_contact()
    async with upstream.request("POST", url, encode(body), {"Content-Type": "application/json", **headers}) as answer:
        return answer.status, await answer.read()
