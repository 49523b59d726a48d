"""Pass one request to a backend and stream its answer back unbuffered, chunk by chunk."""

from __future__ import annotations

import json

from controller.errors import UpstreamError
from proxy.asgi import Headers, Send
from proxy.dialects import openai_error
from proxy.upstream import Upstream

_FORWARDED_RESPONSE_HEADERS = (b"content-type", b"content-length")
_WHOLE = 1 << 20  # a non-streamed answer up to this size is relayed in one piece


async def forward(
    upstream: Upstream,
    send: Send,
    method: str,
    url: str,
    body: bytes | None,
    content_type: str = "application/json",
) -> int:
    """Relay the backend's status, type and body; return the status. Client headers are not passed on
    (credentials never reach a backend). A failure before the first byte raises UpstreamError; one
    after it ends the stream, with one last SSE error event when the stream is SSE."""
    started = False
    event_stream = False
    try:
        async with upstream.request(method, url, body, {"Content-Type": content_type}) as response:
            headers: Headers = [
                (name.lower(), value)
                for name, value in response.raw_headers
                if name.lower() in _FORWARDED_RESPONSE_HEADERS
            ]
            event_stream = response.headers.get("content-type", "").startswith("text/event-stream")
            if event_stream:
                headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            started = True
            if not event_stream and response.content_length is not None and response.content_length <= _WHOLE:
                await send({"type": "http.response.body", "body": await response.read()})  # one write
                return response.status
            async for chunk in response.iter_chunks():
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
