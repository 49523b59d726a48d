"""``/auth``: sign in and out (web sessions), who am I, and the forward-auth check for the edge."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from quart import Blueprint, Response, current_app, jsonify, request

from controller.auth.asgi import auth_headers, identity_of, request_of
from controller.auth.identity import OPEN, Identity, required_scope
from controller.auth.service import IDENTITY_HEADER, SESSION_COOKIE, AuthService
from controller.errors import AuthError, BadRequest, LlamaControllerError, Unauthenticated
from controller.lifecycle.supervisor import Supervisor
from proxy.dialects import error_body
from proxy.native import PREFIX as NATIVE_PREFIX

blueprint = Blueprint("auth", __name__, url_prefix="/auth")


def _service() -> AuthService:
    service: AuthService = current_app.extensions["llamacontroller.auth"]
    return service


def _error(exc: LlamaControllerError, path: str) -> Response:
    response = jsonify(error_body(path, exc.status, exc.message, exc.code))
    response.status_code = exc.status
    for name, value in auth_headers(exc):
        response.headers[name.decode()] = value.decode()
    return response


def _client() -> str:
    client = request.scope.get("client") or ("", 0)
    return str(client[0])


@blueprint.post("/login")
async def login() -> Response:
    """``{"username", "password"}`` as JSON or a form. Sets a fresh HttpOnly, Secure, SameSite cookie."""
    data: Any = await request.get_json(silent=True) if request.is_json else await request.form
    if not data or not isinstance(data.get("username"), str) or not isinstance(data.get("password"), str):
        raise BadRequest("send 'username' and 'password'")
    service = _service()
    try:
        cookie, user = await service.login(data["username"], data["password"], _client())
    except AuthError as exc:
        return _error(exc, request.path)
    response = jsonify({"user": user.name, "role": user.role, "csrf_token": service.csrf_token(cookie)})
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(service.settings.session_ttl),
        httponly=True,
        secure=True,
        samesite="Strict",
        path="/",
    )
    return response


@blueprint.post("/logout")
async def logout() -> Response:
    await _service().logout(identity_of(request.scope))
    response = jsonify({"signed_out": True})
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


@blueprint.get("/session")
async def session() -> dict[str, Any]:
    identity = identity_of(request.scope)
    body: dict[str, Any] = {"user": identity.subject, "via": identity.via, "scopes": sorted(identity.scopes)}
    cookie = request.cookies.get(SESSION_COOKIE)
    if identity.via == "session" and cookie:
        body["csrf_token"] = _service().csrf_token(cookie)
    return body


@blueprint.get("/verify")
async def verify() -> Response:
    """Caddy forward_auth: the original method and URI arrive as X-Forwarded-Method / X-Forwarded-Uri.

    2xx with a short-lived signed ``X-LlamaController-Identity`` header, or 401/403/429 in the dialect of the
    original path, with WWW-Authenticate / Retry-After. A client-supplied identity header is never trusted
    here. An open path (``/``) passes without credentials (and without an identity). ``/llama/<model>/...``
    goes straight from Caddy to the model's backend, so the model is authorized here — by the same rule as
    everywhere — and the request counts as use of the model (its keep-alive starts again).
    """
    method = request.headers.get("X-Forwarded-Method", "GET").upper()
    uri = request.headers.get("X-Forwarded-Uri", "/")
    path = unquote(uri.split("?", 1)[0]) or "/"  # decoded as the app decodes it: the identity is bound to it
    service = _service()
    needed = required_scope(method, path)
    forwarded = request_of(request.scope, path=path, method=method)
    forwarded_headers = {k: v for k, v in forwarded.headers.items() if k != IDENTITY_HEADER}
    forwarded = type(forwarded)(method, path, forwarded_headers, forwarded.client, forwarded.cookies)
    try:
        try:
            identity = await service.authenticate(forwarded)
        except Unauthenticated:
            if needed is not OPEN:
                raise
            return jsonify({"user": None})
        if needed is not OPEN:
            service.authorize(identity, needed)
        if path.startswith(NATIVE_PREFIX):
            await _authorize_direct_route(path, identity)
    except LlamaControllerError as exc:
        return _error(exc, path)
    response = jsonify({"user": identity.subject})
    response.headers["X-LlamaController-Identity"] = service.sign_identity(identity, method, path)
    return response


async def _authorize_direct_route(path: str, identity: Identity) -> None:
    name = path[len(NATIVE_PREFIX) :].split("/", 1)[0]
    supervisor: Supervisor = current_app.extensions["llamacontroller.supervisor"]
    await supervisor.touch(name, identity.allows_model)
