"""``/llama/<model>/<path>``: llama-server's own API for one model, passed through as is.

The backend gets the path and query exactly as the client sent them (``raw_path``, still percent-encoded):
decoding first would turn ``%3F`` into a query, ``%23`` into a fragment and ``%2F`` into a new path segment.

Three things are not passed through as is, judged on the path as llama-server routes it (percent-decoded):
- a generation's ``n_predict`` / ``max_tokens`` above the model's ``max_predict`` is lowered to it (or
  refused, with ``over_limit: refuse``): see proxy/limits.py;
- ``/metrics`` (every backend's counters) needs the ``metrics`` scope, as the controller's ``/metrics`` does;
- answers that describe the server (``/props``, ``/slots``) lose ``model_path``: where the model files lie on
  the host is the operator's business, not an inference token's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

from common import notes
from common.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    compact_json,
    header,
    read_body,
    run_until_disconnect,
)
from common.directory import HAS_SCOPE_KEY, ModelDirectory
from common.errors import BackendError, Forbidden, NotFound
from common.jsonbody import parse_json_object
from common.upstream import Upstream
from proxy.forward import forward, passed_headers
from proxy.limits import asked_predict, clamp_predict
from proxy.restricted import Restricted

PREFIX = "/llama/"
_PREFIX_BYTES = PREFIX.encode()
METRICS_SCOPE = "metrics"
_SCRUBBED_PATHS = frozenset({"/props", "/slots"})
GENERATING_PATHS = frozenset(  # llama-server's routes that generate tokens (most also without /v1)
    {
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/infill",
        "/responses",
        "/v1/responses",
        "/v1/messages",
    }
)
_HIDDEN_KEYS = frozenset({"model_path"})
_MAX_SCRUBBED = 4 << 20  # a description (a few KiB) larger than this is refused, never buffered


def _escape(raw: bytes) -> bytes:
    """Percent-encode what may not appear in a request line (non-ASCII, spaces, controls); keep the rest."""
    return b"".join(bytes([c]) if 0x20 < c < 0x7F else b"%%%02X" % c for c in raw)


def split_native_target(scope: Scope) -> tuple[str, bytes]:
    """``/llama/gemma3:270m/v1/models?x=1`` → (``gemma3:270m``, ``b"/v1/models?x=1"``), from the raw path."""
    raw: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
    rest = raw[len(_PREFIX_BYTES) :] if raw.startswith(_PREFIX_BYTES) else raw.lstrip(b"/")
    name_raw, slash, tail = rest.partition(b"/")
    name = unquote(name_raw.decode("latin-1"))
    if not name:
        raise NotFound("use /llama/<model>/<llama-server path>, e.g. /llama/gemma3:270m/health")
    target = _escape(b"/" + tail if slash else b"/")
    query: bytes = scope.get("query_string", b"")
    return name, target + (b"?" + _escape(query) if query else b"")


def routed_path(target: bytes) -> str:
    """The path llama-server routes ``target`` to, or near enough to compare: decoded, without the query,
    repeated slashes, dot segments or a trailing slash (``/%6Detrics/`` and ``//./metrics`` are ``/metrics``)."""
    path = unquote(target.split(b"?", 1)[0].decode("latin-1"), errors="replace")
    segments = [s for s in re.split(r"/+", path) if s not in ("", ".")]
    return "/" + "/".join(segments)


def scrub(value: Any) -> Any:
    """``value`` without the keys that say where files lie, at any depth."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in _HIDDEN_KEYS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


class _Scrubbing:
    """An ASGI ``send`` that buffers a JSON answer and passes it on without the hidden keys."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        self._body += message.get("body", b"")
        if len(self._body) > _MAX_SCRUBBED:
            raise BackendError("the model's backend sent too large a description of itself")
        if message.get("more_body"):
            return
        assert self._start is not None
        body = bytes(self._body)
        try:
            body = json.dumps(scrub(json.loads(body)), ensure_ascii=False).encode()
        except (ValueError, RecursionError):
            pass  # not JSON (an error page): nothing of ours to hide in it
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


class NativeRoutes:
    def __init__(self, directory: ModelDirectory, upstream: Upstream, max_body: int) -> None:
        self._directory = directory
        self._upstream = upstream
        self._max_body = max_body

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> str:
        name, target = split_native_target(scope)
        path = routed_path(target)
        has_scope: Callable[[str], bool] | None = scope.get(HAS_SCOPE_KEY)
        if path == "/metrics" and has_scope is not None and not has_scope(METRICS_SCOPE):
            raise Forbidden("a backend's /metrics needs a token with the 'metrics' scope")
        notes.note_asked(name)
        body = await read_body(scope, receive, self._max_body)
        content_type = (header(scope, b"content-type") or b"application/json").decode("latin-1")
        method: str = scope["method"]
        extra = passed_headers(scope)
        answer: Send = _Scrubbing(send) if path in _SCRUBBED_PATHS and method == "GET" else send
        # A generation's body is read (llama-server takes only JSON there) so that max_predict holds on it too.
        request = parse_json_object(body) if method == "POST" and path in GENERATING_PATHS else None
        asked = asked_predict(request) if request is not None else None

        async def work() -> None:
            async with Restricted.for_scope(self._directory, scope).lease(name, num_predict=asked) as lease:
                clamped = clamp_predict(request, lease.max_predict) if request is not None else None
                sent = (body if clamped is None else compact_json(clamped)) or None
                headers = {**extra, **lease.credentials}
                await forward(self._upstream, answer, method, lease.url, sent, content_type, headers, target=target)

        await run_until_disconnect(receive, work())
        return name
