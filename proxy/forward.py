"""Pass one request to a backend and stream its answer back unbuffered, chunk by chunk."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

from common import notes
from common.asgi import Headers, Scope, Send, header
from common.dialects import openai_error
from common.errors import UpstreamError
from common.upstream import Upstream

_FORWARDED_RESPONSE_HEADERS = (b"content-type", b"content-length")
_WHOLE = 1 << 20  # a non-streamed answer up to this size is relayed in one piece
REQUEST_ID_KEY = "llamacontroller.request_id"
_TRACE_HEADERS = ((b"traceparent", "traceparent"), (b"tracestate", "tracestate"))
_MAX_TRACE_VALUE = 512


def _printable(value: bytes) -> bool:
    return 0 < len(value) <= _MAX_TRACE_VALUE and all(0x20 <= c < 0x7F for c in value)


def request_id(scope: Scope) -> str:
    """The client's ``X-Request-Id`` when it is sane, else a new one; kept in the scope for the log line."""
    known: str | None = scope.get(REQUEST_ID_KEY)
    if known is None:
        given = header(scope, b"x-request-id")
        known = given.decode() if given is not None and _printable(given) and len(given) <= 128 else None
        known = known or secrets.token_hex(8)
        scope[REQUEST_ID_KEY] = known
    return known


def passed_headers(scope: Scope) -> dict[str, str]:
    """What the backend gets from the client's headers: the request id and W3C trace context, nothing else
    (credentials and cookies never reach a backend)."""
    passed = {"X-Request-Id": request_id(scope)}
    for raw, name in _TRACE_HEADERS:
        value = header(scope, raw)
        if value is not None and _printable(value):
            passed[name] = value.decode()
    return passed


async def forward(
    upstream: Upstream,
    send: Send,
    method: str,
    url: str,
    body: bytes | None,
    content_type: str = "application/json",
    extra: Mapping[str, str] | None = None,
    *,
    target: bytes | None = None,
) -> int:
    """Relay the backend's status, type and body; return the status. Only ``extra`` headers (request id,
    trace context) are passed on. A failure before the first byte raises UpstreamError; one after it ends
    the stream, with one last SSE error event when the stream is SSE."""
    started = False
    event_stream = False
    headers_out = {"Content-Type": content_type, **(extra or {})}
    notes.note_backend_contact()
    try:
        async with upstream.request(method, url, body, headers_out, target=target) as response:
            headers: Headers = [
                (name.lower(), value)
                for name, value in response.raw_headers
                if name.lower() in _FORWARDED_RESPONSE_HEADERS
                # a length is relayed only where it framed the answer (not next to chunked), or for HEAD
                and (name.lower() != b"content-length" or response.content_length is not None or method == "HEAD")
            ]
            event_stream = response.headers.get("content-type", "").startswith("text/event-stream")
            if event_stream:
                headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            start = {"type": "http.response.start", "status": response.status, "headers": headers}
            if not event_stream and response.content_length is not None and response.content_length <= _WHOLE:
                whole = await response.read()  # before the status: a backend that stalls here is a clean 504
                notes.sniff_timings(whole)
                await send(start)
                started = True
                await send({"type": "http.response.body", "body": whole})  # one write
                return response.status
            await send(start)
            started = True
            async for chunk in response.iter_chunks():
                notes.sniff_timings(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return response.status
    except UpstreamError as exc:
        if not started:
            raise
        if event_stream:
            event = openai_error(exc.status, exc.message, exc.code)
            await send(
                {"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return exc.status
