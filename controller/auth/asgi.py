"""The authentication layer in front of everything: identity in, or an error in the caller's dialect.

It sets ``scope["llamacontroller.identity"]`` for the control API and
``scope["llamacontroller.allow_model"]`` (a predicate) for the gateway, which knows the model only
once it has read the body.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any

from common.asgi import ASGIApp, Receive, Scope, Send, send_json
from common.dialects import error_body
from common.directory import ALLOW_MODEL_KEY, HAS_SCOPE_KEY
from common.errors import AuthError, LlamaControllerError, RateLimited, Unavailable
from common.peers import client_address
from common.wire import VERIFY_PATH
from controller.auth.authenticate import Authenticator, Request
from controller.auth.identity import OPEN, Identity, required_scope

IDENTITY_KEY = "llamacontroller.identity"


def auth_headers(exc: LlamaControllerError) -> list[tuple[bytes, bytes]]:
    if isinstance(exc, RateLimited):
        return [(b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode())]
    if exc.status == 401:
        return [(b"www-authenticate", b'Bearer realm="llamacontroller"')]
    return []


def identity_of(scope: Any) -> Identity:
    """The identity the middleware attached to this request's scope."""
    identity: Identity = scope[IDENTITY_KEY]
    return identity


def request_of(scope: Any, path: str | None = None, method: str | None = None) -> Request:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    cookies: dict[str, str] = {}
    if "cookie" in headers:
        try:
            cookies = {k: m.value for k, m in SimpleCookie(headers["cookie"]).items()}
        except CookieError:
            cookies = {}
    client = client_address(scope)  # through the edge: the address it forwarded, not the edge's own
    return Request(method or scope["method"], path or scope["path"], headers, client, cookies)


class AuthMiddleware:
    """Authentication in front of everything; also answers the edge's ``GET /auth/verify`` itself."""

    def __init__(
        self,
        app: ASGIApp,
        service: Authenticator,
        verify: ASGIApp | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.verify = verify
        self.on_refused = on_refused  # counts refusals by status (metrics); never told who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == VERIFY_PATH and self.verify is not None and scope["method"] in ("GET", "HEAD"):
            await self.verify(scope, receive, send)
            return
        needed = required_scope(scope["method"], path)
        if needed is not OPEN:
            try:
                identity = await self.service.authenticate(request_of(scope))
                self.service.authorize(identity, needed)
            except (AuthError, Unavailable) as exc:  # Unavailable: the store cannot be asked (Redis down)
                if self.on_refused is not None and isinstance(exc, AuthError):
                    self.on_refused(exc.status)
                await send_json(
                    send, exc.status, error_body(path, exc.status, exc.message, exc.code), auth_headers(exc)
                )
                return
            scope[IDENTITY_KEY] = identity
            scope[ALLOW_MODEL_KEY] = identity.allows_model
            scope[HAS_SCOPE_KEY] = identity.has
        await self.app(scope, receive, send)
