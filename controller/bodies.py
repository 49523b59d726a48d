"""Request bodies the control plane reads (Quart): bounded per path, and refused in the caller's words.

The gateway reads its bodies itself (``common.asgi.read_body``); everything else goes through Quart, whose
body limit is ``server.max_body_bytes`` (64 MiB by default) for every path. The sign-in forms are read before
anyone is known, so they get a limit of their own that fits a user name and a password with room to spare.
"""

from __future__ import annotations

from typing import Any

from quart import Request, request
from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import PayloadTooLarge

SIGN_IN_PATHS = frozenset({"/ui/login", "/auth/login"})
SIGN_IN_LIMIT = 16 * 2**10


class BoundedRequest(Request):
    """Quart's request, with the smaller limit on the sign-in forms (Quart sets a body's limit when it makes
    the request, from the app's config alone)."""

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        limit: int | None = kwargs.get("max_content_length")
        if path in SIGN_IN_PATHS:
            limit = SIGN_IN_LIMIT if limit is None else min(limit, SIGN_IN_LIMIT)
            kwargs["max_content_length"] = limit
        super().__init__(method, scheme, path, *args, **kwargs)
        self.max_content_length = limit


def too_large(exc: RequestEntityTooLarge) -> PayloadTooLarge:
    """Quart's 413 in the words every other path uses."""
    return PayloadTooLarge(f"request body is larger than the limit of {request.max_content_length} bytes")
