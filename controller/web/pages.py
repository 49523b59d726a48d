"""The dashboard (live model states), load/unload/switch, a model's logs, and the system page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import yaml
from quart import Response, redirect, render_template, stream_with_context

from common.errors import LlamaControllerError
from common.names import canonical
from controller import __version__
from controller.api.sse import PING, StreamAccess, heartbeat, sse_response, sse_stream
from controller.api.system import llama_server_facts
from controller.auth.identity import Scope
from controller.config import Config
from controller.events import Event, ModelStateChanged
from controller.observability import EventBus
from controller.services import services
from controller.web.base import Viewer, blueprint, htmx, page, supervisor, vendor_scripts
from controller.web.present import ModelRow, model_row, redact, row_id

LOG_LINES = 200
FAILED_TAIL = 8


async def rows(me: Viewer) -> list[ModelRow]:
    found = supervisor()
    infos = await found.models(me.identity.allows_model)
    return [model_row(info, found.logbook.tail(canonical(info.name), FAILED_TAIL)) for info in infos]


async def one_row(me: Viewer, name: str) -> ModelRow:
    found = supervisor()
    info = await found.model(name, me.identity.allows_model)
    return model_row(info, found.logbook.tail(canonical(info.name), FAILED_TAIL))


async def render(template: str, me: Viewer | None, **context: Any) -> str:
    return await render_template(template, me=me, scripts=vendor_scripts(), version=__version__, **context)


@blueprint.get("/")
@page()
async def dashboard(me: Viewer) -> str:
    models = await rows(me)
    return await render("dashboard.html", me, models=models, notice=None)


@blueprint.get("/models/<name>/row")
@page()
async def model_fragment(me: Viewer, name: str) -> str:
    return await render("_row.html", me, model=await one_row(me, name))


@blueprint.post("/models/<name>/<action>")
@page(Scope.MODELS, write=True)
async def model_action(me: Viewer, name: str, action: str) -> Any:
    """Load, switch (load alone) or unload; answers the row (htmx) or goes back to the dashboard."""
    found = supervisor()
    entry = await found.resolve(name, me.identity.allows_model)
    if action not in ("load", "switch", "unload"):
        return Response("unknown action", status=404)
    failure: LlamaControllerError | None = None
    try:
        if action == "unload":
            await found.unload(entry.name, me.identity.allows_model)
        else:
            await found.load(entry.name, exclusive=action == "switch")
    except LlamaControllerError as exc:  # the row shows the failed state and its log lines
        failure = exc
    if htmx():
        return await render("_row.html", me, model=await one_row(me, entry.name))
    if failure is None:
        return redirect("/ui/", 303)
    # Without JavaScript: the dashboard with the message (never carried in a URL someone else could write).
    page_html = await render("dashboard.html", me, models=await rows(me), notice=failure.message)
    return Response(page_html, status=failure.status, content_type="text/html; charset=utf-8")


@blueprint.get("/events")
@page()
async def events(me: Viewer) -> Response:
    """Server-sent events for the dashboard: a model's new row (HTML) whenever its state changes."""
    bus: EventBus = services().events
    access = StreamAccess(me.identity)  # the session, asked about again at each heartbeat

    def wanted(event: Event) -> bool:
        return isinstance(event, ModelStateChanged) and access.identity.allows_model(event.model)

    @stream_with_context
    async def stream() -> AsyncIterator[bytes]:
        with bus.subscription(wanted) as queue:
            yield b": connected\n\n"
            async for event in heartbeat(queue, access):
                if event is PING:
                    yield b": ping\n\n"
                    continue
                viewing = Viewer(access.identity, me.csrf)
                try:
                    row = await one_row(viewing, event.model)
                except LlamaControllerError:
                    continue
                html = await render("_row.html", viewing, model=row)
                data = "".join(f"data: {line}\n" for line in html.strip().splitlines())
                yield f"event: {row_id(row.name)}\n{data}\n".encode()

    return sse_response(stream())


@blueprint.get("/models/<name>/logs")
@page(Scope.MODELS)
async def logs(me: Viewer, name: str) -> str:
    found = supervisor()
    entry = await found.resolve(name, me.identity.allows_model)
    lines = found.logbook.tail(entry.key, LOG_LINES)
    return await render("logs.html", me, model=entry.name, lines=lines)


@blueprint.get("/models/<name>/logs/stream")
@page(Scope.MODELS)
async def log_stream(me: Viewer, name: str) -> Response:
    """New lines of the model's log as server-sent events (``data: "<line>"``), after the page's own tail."""
    found = supervisor()
    entry = await found.resolve(name, me.identity.allows_model)
    access = StreamAccess(me.identity, Scope.MODELS, entry.name)

    async def stream() -> AsyncIterator[bytes]:
        with found.logbook.subscription(entry.key) as queue:
            yield b": connected\n\n"
            async for event in sse_stream(queue, access):
                yield event

    return sse_response(stream())


@blueprint.get("/models/<name>/logs/download")
@page(Scope.MODELS)
async def log_download(me: Viewer, name: str) -> Response:
    """The whole log file (this run's backends and earlier ones, as far as kept)."""
    found = supervisor()
    entry = await found.resolve(name, me.identity.allows_model)
    filename = f"{entry.key.replace(':', '_')}.log"
    headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Disposition": f'attachment; filename="{filename}"'}
    response = Response(found.runtime.logs(entry.key), headers=headers)
    response.timeout = None
    return response


@blueprint.get("/system")
@page(Scope.ADMIN)
async def system(me: Viewer) -> str:
    config: Config = services().config
    edge = services().edge
    shown = yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False, allow_unicode=True)
    facts = await llama_server_facts(config)
    return await render(
        "system.html", me, config=config, edge=edge.public() if edge else None, shown=shown, llama=facts
    )


@blueprint.get("/system/ca.pem")
@page()
async def local_ca(me: Viewer) -> Response:
    """The edge's local CA root certificate, for clients to trust."""
    edge = services().edge
    if edge is None:
        return Response("the HTTPS edge is not enabled here\n", status=404, content_type="text/plain")
    pem = await edge.ca_certificate()
    headers = {"Content-Disposition": 'attachment; filename="llamacontroller-ca.pem"'}
    return Response(pem, content_type="application/x-pem-file", headers=headers)
