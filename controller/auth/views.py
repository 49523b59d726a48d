"""``/auth``: sign in and out (web sessions) and who am I. (``/auth/verify``, the edge's forward-auth check, is
answered in raw ASGI by controller/auth/verify.py.)"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, jsonify, request
from werkzeug.sansio.response import Response as SansIOResponse  # Quart's and a redirect's alike

from common.dialects import error_body
from common.errors import AuthError, BadRequest, LlamaControllerError
from common.peers import client_address
from controller.api.inputs import json_object
from controller.auth.asgi import auth_headers, identity_of
from controller.auth.authenticate import SESSION_COOKIE, Authenticator
from controller.services import services

blueprint = Blueprint("auth", __name__, url_prefix="/auth")


def _service() -> Authenticator:
    service: Authenticator = services().auth
    return service


def _error(exc: LlamaControllerError, path: str) -> Response:
    response = jsonify(error_body(path, exc.status, exc.message, exc.code))
    response.status_code = exc.status
    for name, value in auth_headers(exc):
        response.headers[name.decode()] = value.decode()
    return response


def _client() -> str:
    return client_address(request.scope)


def set_session_cookie(response: SansIOResponse, cookie: str, ttl: float) -> None:
    """The session cookie: HTTPS only, out of reach of scripts, never sent by other sites."""
    response.set_cookie(
        SESSION_COOKIE, cookie, max_age=int(ttl), httponly=True, secure=True, samesite="Strict", path="/"
    )


def clear_session_cookie(response: SansIOResponse) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")


@blueprint.post("/login")
async def login() -> Response:
    """``{"username", "password"}`` as JSON or a form. Sets a fresh HttpOnly, Secure, SameSite cookie."""
    data: Any = await json_object() if request.is_json else await request.form
    if not data or not isinstance(data.get("username"), str) or not isinstance(data.get("password"), str):
        raise BadRequest("send 'username' and 'password'")
    service = _service()
    try:
        cookie, user = await service.login(data["username"], data["password"], _client())
    except AuthError as exc:
        return _error(exc, request.path)
    response = jsonify({"user": user.name, "role": user.role, "csrf_token": service.csrf_token(cookie)})
    set_session_cookie(response, cookie, service.settings.session_ttl)
    return response


@blueprint.post("/logout")
async def logout() -> Response:
    await _service().logout(identity_of(request.scope))
    response = jsonify({"signed_out": True})
    clear_session_cookie(response)
    return response


@blueprint.get("/session")
async def session() -> dict[str, Any]:
    identity = identity_of(request.scope)
    body: dict[str, Any] = {"user": identity.subject, "via": identity.via, "scopes": sorted(identity.scopes)}
    cookie = request.cookies.get(SESSION_COOKIE)
    if identity.via == "session" and cookie:
        body["csrf_token"] = _service().csrf_token(cookie)
    return body
