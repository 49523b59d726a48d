"""``GET /auth/verify``: the edge's forward_auth check, answered in raw ASGI (it runs once per request that
passes the edge, so it stays off Quart: measured, the framework hop cost about as much as the check).

Caddy sends the original method and URI as X-Forwarded-Method / X-Forwarded-Uri. The answer is 200 with a
short-lived signed ``X-LlamaController-Identity``, or 401/403/429 in the dialect of the original path with
WWW-Authenticate / Retry-After, which Caddy hands to the client as they are. A client-supplied identity
header is never trusted here. An open path (``/``) passes without credentials (and without an identity).

The edge this project renders does not use it (the gateway checks tokens itself, measured cheaper; see
controller/edge/render.py); it is here for a proxy of the operator's own in front of the app. A model named
in the path is authorized where it is used, by the gateway, with the same rule as everywhere.
"""

from __future__ import annotations

from urllib.parse import unquote

from common.asgi import Scope, Send, header, send_json
from common.dialects import error_body
from common.errors import LlamaControllerError, Unauthenticated
from common.wire import IDENTITY_HEADER
from controller.auth.asgi import auth_headers, request_of
from controller.auth.authenticate import Authenticator
from controller.auth.identity import OPEN, required_scope

_IDENTITY = IDENTITY_HEADER.lower()  # as ASGI carries header names


async def forward_auth(scope: Scope, send: Send, service: Authenticator) -> None:
    method = (header(scope, b"x-forwarded-method") or b"GET").decode("latin-1").upper()
    uri = (header(scope, b"x-forwarded-uri") or b"/").decode("latin-1")
    path = unquote(uri.split("?", 1)[0]) or "/"  # decoded as the app decodes it: the identity is bound to it
    needed = required_scope(method, path)
    forwarded = request_of(scope, path=path, method=method)
    headers = {k: v for k, v in forwarded.headers.items() if k != _IDENTITY}
    forwarded = type(forwarded)(method, path, headers, forwarded.client, forwarded.cookies)
    try:
        try:
            identity = await service.authenticate(forwarded)
        except Unauthenticated:
            if needed is not OPEN:
                raise
            await send_json(send, 200, {"user": None})
            return
        if needed is not OPEN:
            service.authorize(identity, needed)
    except LlamaControllerError as exc:
        await send_json(send, exc.status, error_body(path, exc.status, exc.message, exc.code), auth_headers(exc))
        return
    signed = service.sign_identity(identity, method, path)
    await send_json(send, 200, {"user": identity.subject}, [(_IDENTITY.encode(), signed.encode())])
