"""``/internal/v1/*``: the directory protocol, which only the gateway processes speak (docs/architecture.md).

Every route needs the shared secret (``Authorization: Bearer``; ``internal_secret`` in auth/secrets.py), which
only the processes of one deployment hold. The edge never routes these paths and the gateways refuse them,
so a client cannot reach them; a wrong or missing secret is a 401 all the same.

- ``GET directory?epoch=&after=&wait=``: the directory's changes since a revision (lifecycle/publisher.py).
- ``POST resolve {name}``: a name the gateway's copy does not know (a file added since, a typo): the catalog's
  name for it, or the catalog's error.
- ``POST ensure {gateway, seq, model, keep_alive, embeddings, ctx_size, num_predict}``: a ready backend for the
  request, loading the model if needed (concurrent callers join one load); the backend is held for the gateway
  until its first report after ``seq``.
- ``POST unload {model}``: stop the model once the requests on it, in every gateway, have ended.
- ``POST report {gateway, seq, epoch, revision, models, leaving}``: a gateway's counts, made from that directory
  revision (lifecycle/gateways.py); ``leaving``: its last, as it stops (forgotten at once, not after its TTL).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, request

from common.durations import parse_keep_alive
from common.errors import BadRequest, Unauthenticated
from common.wire import INTERNAL_PREFIX
from controller.api.inputs import json_object, whole_number
from controller.auth.secrets import same
from controller.lifecycle.gateways import checked_count, checked_number, parse_models
from controller.services import services

blueprint = Blueprint("internal", __name__, url_prefix=f"{INTERNAL_PREFIX}v1")

MAX_GATEWAY_ID = 128


@blueprint.before_request
async def shared_secret() -> None:
    given = request.headers.get("Authorization", "")
    expected = services().internal_secret
    if not expected or not given.startswith("Bearer ") or not same(given.removeprefix("Bearer "), expected):
        raise Unauthenticated("the internal routes need the deployment's shared secret")


def _text(body: dict[str, Any], key: str, limit: int = 256) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadRequest(f"{key} must be a non-empty string of at most {limit} characters")
    return value


def _optional_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    return None if value is None else checked_number(value, key)


def _optional_count(body: dict[str, Any], key: str) -> int | None:
    """A request's num_ctx or num_predict: any count an Ollama option may hold (proxy/ollama/options.py takes
    up to 2**63), which the model's limits then clamp or refuse as for a request the controller serves."""
    value = _optional_number(body, key)
    if value is not None and (value != int(value) or not 0 <= value <= 1 << 63):
        raise BadRequest(f"{key} must be a whole number")
    return None if value is None else int(value)


def _seq(body: dict[str, Any]) -> int:
    return checked_count(body.get("seq"), "seq", below=1 << 62)


@blueprint.get("/directory")
async def directory() -> dict[str, Any]:
    args = request.args
    after = whole_number(args.get("after", "0"), "after", 1 << 29)
    wait = whole_number(args.get("wait", "0"), "wait", 60, clamp=True)
    epoch = args.get("epoch") or None
    return await services().publisher.changes(epoch, after, float(wait))


@blueprint.post("/resolve")
async def resolve() -> dict[str, Any]:
    body = await json_object()
    entry = await services().supervisor.resolve(_text(body, "name"))
    return {"model": entry.name}


@blueprint.post("/ensure")
async def ensure() -> dict[str, Any]:
    body = await json_object()
    gateway, seq, model = _text(body, "gateway", MAX_GATEWAY_ID), _seq(body), _text(body, "model")
    asked = _optional_number(body, "keep_alive")
    keep_alive = None if asked is None else parse_keep_alive(asked)  # -1: forever
    embeddings = body.get("embeddings", False)
    if not isinstance(embeddings, bool):
        raise BadRequest("embeddings must be true or false")
    supervisor, publisher = services().supervisor, services().publisher
    held = supervisor.lease(
        model,
        keep_alive=keep_alive,
        embeddings=embeddings,
        ctx_size=_optional_count(body, "ctx_size"),
        num_predict=_optional_count(body, "num_predict"),
    )
    async with held as lease:
        # Held for the gateway before this lease ends, so that the backend cannot stop in between.
        publisher.reports.hold(gateway, seq, lease.model, lease.handle)
    publisher.nudge()
    return {
        "model": lease.model,
        "url": lease.url,
        "api_key": lease.api_key,
        "handle": lease.handle,
        "max_predict": lease.max_predict,
        "load_duration": lease.load_duration,
    }


@blueprint.post("/unload")
async def unload() -> dict[str, Any]:
    body = await json_object()
    await services().supervisor.unload(_text(body, "model"))
    return {"status": "unloaded"}


@blueprint.post("/report")
async def report() -> dict[str, Any]:
    body = await json_object()
    gateway, seq = _text(body, "gateway", MAX_GATEWAY_ID), _seq(body)
    epoch, revision = body.get("epoch") or "", body.get("revision", -1)
    if not isinstance(epoch, str) or not isinstance(revision, int) or isinstance(revision, bool):
        raise BadRequest("epoch must be a string and revision a whole number")
    leaving = body.get("leaving", False)
    if not isinstance(leaving, bool):
        raise BadRequest("leaving must be true or false")
    models = parse_models(body.get("models", {}))
    await services().publisher.take_report(gateway, seq, models, (epoch, revision), leaving)
    return {"status": "ok"}
