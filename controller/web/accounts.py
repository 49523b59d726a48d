"""Signing in and out, API tokens (everyone their own; admins all), and users (admins)."""

from __future__ import annotations

import math
from typing import Any

from quart import Response, redirect, request

from common.errors import BadRequest, LlamaControllerError, RateLimited, Unauthenticated
from common.peers import client_address
from controller.auth.bounds import parse_rpm
from controller.auth.identity import Scope
from controller.auth.views import clear_session_cookie, set_session_cookie
from controller.store.base import Role
from controller.web.base import Viewer, administration, authenticator, blueprint, page, viewer
from controller.web.pages import render
from controller.web.present import ago, safe_next

SCOPE_ORDER = [Scope.INFERENCE, Scope.MODELS, Scope.METRICS, Scope.ADMIN]


def _client() -> str:
    return client_address(request.scope)


def _globs(text: str) -> list[str]:
    return [part.strip() for part in text.replace(",", " ").split() if part.strip()]


@blueprint.get("/login")
async def login_page() -> Any:
    if await viewer() is not None:
        return redirect(safe_next(request.args.get("next")))
    return await render("login.html", None, next=safe_next(request.args.get("next")), error=None)


@blueprint.post("/login")
async def login() -> Any:
    """A wrong password answers the form again with the message, as a page (200): 401 is HTTP authentication's
    status, which needs a challenge (WWW-Authenticate) a sign-in form has none of, and browsers log it as an
    error. Throttled: 429 with Retry-After."""
    form = await request.form
    target = safe_next(form.get("next"))
    try:
        cookie, _ = await authenticator().login(form.get("username", ""), form.get("password", ""), _client())
    except RateLimited as exc:
        minutes = max(1, round(exc.retry_after / 60))
        error = f"Too many failed sign-ins. Wait about {minutes} minute{'s' if minutes > 1 else ''} and try again."
        page_html = await render("login.html", None, next=target, error=error)
        return page_html, 429, {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    except Unauthenticated:
        return await render("login.html", None, next=target, error="Wrong user name or password."), 200
    response = redirect(target, 303)
    set_session_cookie(response, cookie, authenticator().settings.session_ttl)
    return response


@blueprint.post("/logout")
@page(write=True)
async def logout(me: Viewer) -> Any:
    await authenticator().logout(me.identity)
    response = redirect("/ui/login", 303)
    clear_session_cookie(response)
    return response


# ---------------------------------------------------------------------- tokens


async def _tokens_page(me: Viewer, created: str | None = None, error: str | None = None, status: int = 200) -> Any:
    tokens = await administration().tokens_for(me.identity)
    shown = sorted(tokens, key=lambda t: (t.revoked, -t.created_at))
    scopes = [scope for scope in SCOPE_ORDER if me.identity.has(scope)]
    page_html = await render("tokens.html", me, tokens=shown, created=created, error=error, scopes=scopes, ago=ago)
    return page_html, status


@blueprint.get("/tokens")
@page()
async def tokens(me: Viewer) -> Any:
    return await _tokens_page(me)


@blueprint.post("/tokens")
@page(write=True)
async def create_token(me: Viewer) -> Any:
    """The secret is shown in this answer only (with a copy button)."""
    form = await request.form
    # Unknown scopes are the service's 400, as on the API: dropping them made a token other than the one asked for.
    chosen = form.getlist("scopes") or [Scope.INFERENCE.value]
    try:
        secret, _ = await administration().create_token(
            me.name,
            form.get("name", "").strip() or "unnamed",
            chosen,
            _globs(form.get("models", "")),
            form.get("expires", "").strip() or None,
            parse_rpm(form.get("rpm", "")),
            me.name,
            creator=me.identity,
        )
    except LlamaControllerError as exc:
        return await _tokens_page(me, error=exc.message, status=exc.status)
    return await _tokens_page(me, created=secret, status=201)


@blueprint.post("/tokens/<token_id>/revoke")
@page(write=True)
async def revoke_token(me: Viewer, token_id: str) -> Any:
    try:
        await administration().revoke_token(token_id, me.name, by=me.identity)
    except LlamaControllerError as exc:
        return await _tokens_page(me, error=exc.message, status=exc.status)
    return redirect("/ui/tokens", 303)


# ---------------------------------------------------------------------- users


async def _users_page(me: Viewer, notice: str | None = None, error: str | None = None, status: int = 200) -> Any:
    users = await administration().store.list_users()
    return await render("users.html", me, users=users, notice=notice, error=error), status


@blueprint.get("/users")
@page(Scope.ADMIN)
async def users(me: Viewer) -> Any:
    return await _users_page(me)


@blueprint.post("/users")
@page(Scope.ADMIN, write=True)
async def add_user(me: Viewer) -> Any:
    form = await request.form
    role: Role = "admin" if form.get("role") == "admin" else "user"
    try:
        user = await administration().add_user(
            form.get("name", "").strip(), form.get("password", ""), role, me.name, tuple(_globs(form.get("models", "")))
        )
    except LlamaControllerError as exc:
        return await _users_page(me, error=exc.message, status=exc.status)
    return await _users_page(me, notice=f"Added {user.role} {user.name}.", status=201)


@blueprint.post("/users/<name>/<action>")
@page(Scope.ADMIN, write=True)
async def change_user(me: Viewer, name: str, action: str) -> Any:
    form = await request.form
    admin = administration()
    try:
        if action in ("disable", "enable"):
            if name.lower() == me.name.lower() and action == "disable":
                raise BadRequest("you cannot disable your own account")
            await admin.set_disabled(name, action == "disable", me.name)
            notice = f"{name} is {action}d."
        elif action == "password":
            await admin.set_password(name, form.get("password", ""), me.name)
            notice = f"The password of {name} was reset; their sessions were ended."
        elif action == "models":
            await admin.set_models(name, tuple(_globs(form.get("models", ""))), me.name)
            notice = f"The models {name} may use were changed."
        else:
            return Response("unknown action", status=404)
    except LlamaControllerError as exc:
        return await _users_page(me, error=exc.message, status=exc.status)
    return await _users_page(me, notice=notice)
