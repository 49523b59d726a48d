"""OpenAI- and Anthropic-compatible ``/v1/*``: route by the body's ``model``, load on demand, pass through.

llama-server serves each of these paths itself; the gateway finds the model, authorizes it, leases a
backend and relays the answer unchanged (streams unbuffered).
"""

from __future__ import annotations

from typing import Any

from common import notes
from common.asgi import Receive, Scope, Send, compact_json, read_body, run_until_disconnect, send_json
from common.directory import ModelDirectory, ModelInfo
from common.errors import BadRequest
from common.jsonbody import parse_json_object
from common.upstream import Upstream
from proxy.forward import forward, passed_headers
from proxy.limits import asked_predict, clamp_predict
from proxy.restricted import Restricted

EMBEDDING_PATHS = frozenset({"/v1/embeddings"})  # need a backend started with --embeddings
PASSTHROUGH_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/v1/reranking",
    }
)


def model_object(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": int(info.modified_at), "owned_by": "llamacontroller"}


class OpenAIRoutes:
    def __init__(self, directory: ModelDirectory, upstream: Upstream, max_body: int) -> None:
        self._directory = directory
        self._upstream = upstream
        self._max_body = max_body

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> str | None:
        """POST one of PASSTHROUGH_PATHS; returns the model name."""
        body = await read_body(scope, receive, self._max_body)
        request = parse_json_object(body)
        name = request.get("model")
        notes.note_asked(name)
        if not isinstance(name, str) or not name:
            raise BadRequest("'model' is required and must be a string")
        path: str = scope["path"]
        extra = passed_headers(scope)

        async def work() -> None:
            directory = Restricted.for_scope(self._directory, scope)
            embeddings = path in EMBEDDING_PATHS
            async with directory.lease(name, embeddings=embeddings, num_predict=asked_predict(request)) as lease:
                clamped = clamp_predict(request, lease.max_predict)
                sent = body if clamped is None else compact_json(clamped)
                headers = {**extra, **lease.credentials}
                await forward(self._upstream, send, "POST", lease.url + path, sent, extra=headers)

        await run_until_disconnect(receive, work())
        return name

    async def list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        models = await Restricted.for_scope(self._directory, scope).models()
        await send_json(send, 200, {"object": "list", "data": [model_object(m) for m in models]})

    async def get_model(self, scope: Scope, receive: Receive, send: Send) -> str:
        """GET /v1/models/<name>."""
        name: str = scope["path"][len("/v1/models/") :]
        notes.note_asked(name)
        await send_json(send, 200, model_object(await Restricted.for_scope(self._directory, scope).model(name)))
        return name
