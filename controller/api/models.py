"""``/control/v1``: the catalog and live state of models, load/unload/switch, logs, and state events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from quart import Blueprint, Response, request

from common.directory import ALLOW_MODEL_KEY, Allowed, ModelInfo
from common.durations import DurationError, parse_keep_alive
from common.errors import BadRequest
from controller.api.inputs import json_object, whole_number
from controller.api.sse import StreamAccess, sse_response, sse_stream
from controller.auth.asgi import identity_of
from controller.auth.identity import required_scope
from controller.events import Event, event_model
from controller.lifecycle.supervisor import Supervisor
from controller.observability import EventBus
from controller.services import services

blueprint = Blueprint("control_models", __name__, url_prefix="/control/v1")

MAX_LOG_LINES = 2000


def _supervisor() -> Supervisor:
    supervisor: Supervisor = services().supervisor
    return supervisor


def _allowed() -> Allowed | None:
    """The caller's model allow-list (None = every model); the supervisor applies the one rule."""
    allowed: Allowed | None = request.scope.get(ALLOW_MODEL_KEY)  # type: ignore[assignment]
    return allowed


def model_json(info: ModelInfo) -> dict[str, Any]:
    """The control API's object for one model: catalog facts, then the live state."""
    return {
        "name": info.name,
        "aliases": list(info.aliases),
        "source": info.source,
        "path": info.path,
        "size": info.size,
        "digest": info.digest,
        "modified_at": info.modified_at,
        "architecture": info.architecture,
        "parameter_count": info.parameter_count,
        "quantization": info.quantization,
        "context_length": info.context_length,
        "capabilities": list(info.capabilities),
        "pinned": info.pinned,
        "file_error": info.file_error,
        **asdict(info.live),
    }


def _access(model: str | None = None) -> StreamAccess:
    """The caller of a stream, asked about again at each heartbeat (with the scope this path needs)."""
    return StreamAccess(identity_of(request.scope), required_scope(request.method, request.path), model)


@blueprint.get("/models")
async def list_models() -> dict[str, Any]:
    return {"models": [model_json(info) for info in await _supervisor().models(_allowed())]}


@blueprint.get("/models/<name>")
async def get_model(name: str) -> dict[str, Any]:
    return model_json(await _supervisor().model(name, _allowed()))


@blueprint.post("/models/<name>/load")
async def load_model(name: str) -> dict[str, Any]:
    """Load a model and wait until it is ready; ``{"exclusive": true}`` unloads the others (a switch)."""
    body = await json_object(optional=True)
    exclusive = body.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise BadRequest("'exclusive' must be true or false")
    keep_alive = None
    if "keep_alive" in body:
        try:
            keep_alive = parse_keep_alive(body["keep_alive"])
        except DurationError as exc:
            raise BadRequest(f"keep_alive: {exc}") from None
    supervisor = _supervisor()
    entry = await supervisor.resolve(name, _allowed())
    return model_json(await supervisor.load(entry.name, exclusive=exclusive, keep_alive=keep_alive))


@blueprint.post("/models/<name>/unload")
async def unload_model(name: str) -> dict[str, Any]:
    """Unload once in-flight requests have finished; returns the stopped model."""
    supervisor = _supervisor()
    entry = await supervisor.resolve(name, _allowed())
    await supervisor.unload(entry.name)
    return model_json(supervisor.info(entry))


def _tail_count() -> int:
    return whole_number(request.args.get("tail", "200"), "tail", MAX_LOG_LINES, clamp=True)


@blueprint.get("/models/<name>/logs")
async def model_logs(name: str) -> Response | dict[str, Any]:
    """The last lines of the model's llama-server log; ``?follow=1`` streams new lines as SSE."""
    supervisor = _supervisor()
    entry = await supervisor.resolve(name, _allowed())
    count = _tail_count()
    if request.args.get("follow") not in ("1", "true"):
        return {"model": entry.name, "lines": supervisor.logbook.tail(entry.key, count)}
    logbook = supervisor.logbook
    access = _access(entry.name)

    async def stream() -> AsyncIterator[bytes]:
        with logbook.subscription(entry.key) as queue:
            for line in logbook.tail(entry.key, count):
                yield f"data: {json.dumps(line)}\n\n".encode()
            async for event in sse_stream(queue, access):
                yield event

    return sse_response(stream())


@blueprint.get("/events")
async def events() -> Response:
    """Model state changes as server-sent events (``{"type": "model_state", ...}``), only of the models
    the caller may see."""
    bus: EventBus = services().events
    access = _access()

    def wanted(event: Event) -> bool:
        return access.identity.allows_model(event_model(event))  # today's allow-list

    async def stream() -> AsyncIterator[bytes]:
        with bus.subscription(wanted) as queue:
            yield b": connected\n\n"
            async for event in sse_stream(queue, access, lambda item: item.to_json()):
                yield event

    return sse_response(stream())
