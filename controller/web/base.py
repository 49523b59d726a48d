"""The web page's blueprint, who is looking at it, CSRF, and the headers every page gets.

Pages are server-rendered (Jinja2). htmx, when its files are installed, only swaps fragments: every form also
works as a plain POST answered with a redirect (303) or a full page. Visitors sign in with the web session
(the cookie of ``Authenticator.login``); a page asked for without one redirects to the sign-in page. Every
state-changing request carries the CSRF token — a hidden form field, or the ``X-CSRF-Token`` header htmx sends.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec
from urllib.parse import quote

from quart import Blueprint, Response, redirect, request
from werkzeug.sansio.response import Response as SansIOResponse  # Quart's and a redirect's alike

from common.errors import AuthError, Forbidden
from controller.auth.admin import Administration
from controller.auth.asgi import request_of
from controller.auth.authenticate import SESSION_COOKIE, Authenticator
from controller.auth.identity import Identity, Scope
from controller.lifecycle.supervisor import Supervisor
from controller.services import services

STATIC = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

blueprint = Blueprint(
    "ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static", static_url_path="/static"
)

P = ParamSpec("P")
View = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Viewer:
    """The signed-in person looking at a page."""

    identity: Identity
    csrf: str

    @property
    def name(self) -> str:
        return self.identity.subject

    @property
    def admin(self) -> bool:
        return self.identity.is_admin

    @property
    def manages_models(self) -> bool:
        return self.identity.has(Scope.MODELS)


def authenticator() -> Authenticator:
    auth: Authenticator = services().auth
    return auth


def administration() -> Administration:
    admin: Administration = services().admin
    return admin


def supervisor() -> Supervisor:
    found: Supervisor = services().supervisor
    return found


def htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def vendor_scripts() -> list[str]:
    """htmx and its SSE extension, when the install step could fetch them (else the page works without)."""
    return [name for name in ("htmx.min.js", "sse.min.js") if (STATIC / "vendor" / name).is_file()]


async def viewer() -> Viewer | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    auth = authenticator()
    try:  # authenticated as a read; the CSRF check of a write is `check_csrf`, which also reads form fields
        identity = await auth.authenticate(request_of(request.scope, method="GET"))
    except AuthError:
        return None
    if identity.via != "session":
        return None
    return Viewer(identity, auth.csrf_token(cookie))


async def check_csrf(me: Viewer) -> None:
    form = await request.form
    presented = request.headers.get("X-CSRF-Token") or form.get("csrf_token", "")
    if not presented or not hmac.compare_digest(presented, me.csrf):
        raise Forbidden("this form is out of date or was not sent by this page (CSRF token missing or wrong)")


def sign_in_first(write: bool) -> SansIOResponse:
    """To the sign-in page, and back here after it (a form's POST goes back to the dashboard: it cannot be
    replayed). Never a 401: that is HTTP authentication's answer, with a challenge a web session has none of.
    htmx follows a redirect inside the page; HX-Redirect makes it load the sign-in page instead."""
    back = "/ui/" if write else request.full_path.rstrip("?")
    target = f"/ui/login?next={quote(back, safe='/')}"
    if htmx():
        return Response("", status=200, headers={"HX-Redirect": target})
    return redirect(target, 303 if write else 302)


def page(scope: str | None = None, write: bool = False) -> Callable[[View], View]:
    """A page for signed-in visitors (with ``scope``); ``write``: the request must carry the CSRF token."""

    def decorate(view: View) -> View:
        @wraps(view)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            me = await viewer()
            if me is None:
                return sign_in_first(write)
            if scope is not None and not me.identity.has(scope):
                raise Forbidden(f"this page needs the '{scope}' permission, which your account does not have")
            if write:
                await check_csrf(me)
            return await view(me, *args, **kwargs)

        return wrapper

    return decorate


@blueprint.after_request
async def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"
    return response
