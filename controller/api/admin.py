"""``/control/v1/tokens``, ``/control/v1/users``, ``/control/v1/audit``: the admin's JSON API."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from quart import Blueprint, request

from common.errors import BadRequest
from controller.api.inputs import json_object, whole_number
from controller.auth.admin import Administration
from controller.auth.asgi import identity_of
from controller.auth.identity import Identity
from controller.services import services
from controller.store.base import User

blueprint = Blueprint("control_admin", __name__, url_prefix="/control/v1")


def _service() -> Administration:
    service: Administration = services().admin
    return service


def _actor() -> str:
    return identity_of(request.scope).subject


def _user(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "role": user.role,
        "disabled": user.disabled,
        "created_at": user.created_at,
        "models": list(user.models),
    }


def _strings(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"'{name}' must be a list of strings")
    return value


def _identity() -> Identity:
    return identity_of(request.scope)


@blueprint.get("/tokens")
async def list_tokens() -> dict[str, Any]:
    """Every token for an admin, a user's own otherwise."""
    return {"tokens": [token.public() for token in await _service().tokens_for(_identity())]}


@blueprint.post("/tokens")
async def create_token() -> tuple[dict[str, Any], int]:
    """The secret is in this answer only: store it now."""
    data = await json_object()
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("'name' is required")
    expires = data.get("expires")
    if expires is not None and not isinstance(expires, str | int | float):
        raise BadRequest("'expires' must be like \"30d\" or a number of seconds")
    rpm = data.get("rpm")
    if rpm is not None and (not isinstance(rpm, int) or isinstance(rpm, bool)):
        raise BadRequest("'rpm' must be a whole number")
    owner = data.get("owner", _actor())
    if not isinstance(owner, str):
        raise BadRequest("'owner' must be a user name")
    scopes, models = _strings(data, "scopes") or ["inference"], _strings(data, "models")
    token, record = await _service().create_token(
        owner, name, scopes, models, expires, rpm, _actor(), creator=_identity()
    )
    return {"token": token, **record.public()}, 201


@blueprint.delete("/tokens/<token_id>")
async def revoke_token(token_id: str) -> dict[str, Any]:
    return (await _service().revoke_token(token_id, _actor(), by=_identity())).public()


@blueprint.get("/users")
async def list_users() -> dict[str, Any]:
    return {"users": [_user(user) for user in await _service().store.list_users()]}


@blueprint.post("/users")
async def add_user() -> tuple[dict[str, Any], int]:
    data = await json_object()
    role = data.get("role", "user")
    if role not in ("admin", "user"):
        raise BadRequest("'role' must be admin or user")
    if not isinstance(data.get("name"), str) or not isinstance(data.get("password"), str):
        raise BadRequest("'name' and 'password' are required")
    user = await _service().add_user(data["name"], data["password"], role, _actor(), tuple(_strings(data, "models")))
    return _user(user), 201


@blueprint.put("/users/<name>/models")
async def set_models(name: str) -> dict[str, Any]:
    """``{"models": ["gemma3*"]}``: the user's model allow-list (also for every token it owns); [] = all."""
    return _user(await _service().set_models(name, tuple(_strings(await json_object(), "models")), _actor()))


@blueprint.post("/users/<name>/password")
async def set_password(name: str) -> dict[str, Any]:
    data = await json_object()
    if not isinstance(data.get("password"), str):
        raise BadRequest("'password' is required")
    await _service().set_password(name, data["password"], _actor())
    return {"name": name, "password_changed": True}


@blueprint.post("/users/<name>/disable")
async def disable_user(name: str) -> dict[str, Any]:
    return _user(await _service().set_disabled(name, True, _actor()))


@blueprint.post("/users/<name>/enable")
async def enable_user(name: str) -> dict[str, Any]:
    return _user(await _service().set_disabled(name, False, _actor()))


@blueprint.get("/audit")
async def audit() -> dict[str, Any]:
    limit = whole_number(request.args.get("limit", "100"), "limit", 1000, clamp=True)
    events = await _service().store.list_audit(limit)
    return {"events": [asdict(event) for event in events]}
