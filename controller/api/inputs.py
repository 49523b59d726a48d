"""What the control plane reads from a request: JSON bodies (control API, ``/auth/*``), query-string numbers.

A JSON body is read only up to a small limit (no control request is anywhere near it) and then decoded
by the gateway's decoder (``common.jsonbody``: bounded depth and numbers, no lone surrogates), and must be
an object. A number in a query string is at most nine ASCII digits: ``str.isdigit()`` also accepts ``"²"``,
which ``int()`` then refuses, and ``int()`` of thousands of digits is slow, then refused.
"""

from __future__ import annotations

from typing import Any

from quart import request

from common.errors import BadRequest, PayloadTooLarge
from common.jsonbody import parse_json_object

MAX_CONTROL_BODY = 1 << 20  # bytes; a token or a user is a few hundred
MAX_DIGITS = 9  # of a number in a query string: more is refused, not read


async def json_object(*, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body; with ``optional``, an empty body is ``{}``."""
    declared = request.content_length
    if declared is not None and declared > MAX_CONTROL_BODY:
        raise PayloadTooLarge(f"request body is larger than the limit of {MAX_CONTROL_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.body:  # piece by piece: nothing over the limit is held whole
        size += len(chunk)
        if size > MAX_CONTROL_BODY:
            raise PayloadTooLarge(f"request body is larger than the limit of {MAX_CONTROL_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if optional and not body.strip():
        return {}
    return parse_json_object(body)


def whole_number(text: str, name: str, maximum: int, *, clamp: bool = False) -> int:
    """``text`` (a query parameter or form field) as an integer from 0 to ``maximum``: at most MAX_DIGITS
    ASCII digits. Over ``maximum``: ``maximum`` when ``clamp``, else a BadRequest."""
    if not (0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()):
        raise BadRequest(f"'{name}' must be a whole number")
    value = int(text)
    if value > maximum:
        if clamp:
            return maximum
        raise BadRequest(f"'{name}' must be at most {maximum}")
    return value
