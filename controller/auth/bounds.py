"""What a new API token may be given (pure): finite, bounded numbers, and never more than the token making it.

A token made with a token (``POST /control/v1/tokens`` with ``Authorization: Bearer``, directly or through
the edge) is bounded by its maker, whatever the maker's scopes:

- models: when the maker has an allow-list, the new list must be non-empty and each glob *within* the
  maker's — one of the maker's globs, a plain name the maker's globs allow, or a glob that begins with the
  fixed prefix of a maker glob ``prefix*`` (``gemma3:1b*`` within ``gemma3*``); anything else is refused,
  even where it might happen to match less (deciding that in general is not worth the risk). Omitted: the
  maker's list.
- rate: at most the maker's requests per minute; omitted: the maker's.
- expiry: no later than the maker's; omitted: the maker's; ``never`` is refused.

A web session or the command line makes tokens as the user itself: only the scope rules apply then.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common.errors import BadRequest, Forbidden
from controller.auth.identity import Identity, glob_allows
from controller.auth.secrets import parse_expiry

MAX_RPM = 1_000_000
MAX_EXPIRY_SECONDS = 10 * 365 * 86400  # ten years
MAX_TOKEN_NAME = 100
MAX_GLOBS = 64
_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses


def expiry_seconds(value: object) -> float | None:
    """Seconds until expiry from ``"30d"``-like text or a number; None for none (omitted, ``never``)."""
    if value is None or isinstance(value, str):
        seconds = parse_expiry(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = float(value) if 0 < value <= MAX_EXPIRY_SECONDS else math.nan  # 10**400 stays an int here
    elif isinstance(value, float):
        seconds = value
    else:
        raise BadRequest("'expires' must be like \"30d\" or a number of seconds")
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= MAX_EXPIRY_SECONDS):
        raise BadRequest(f"'expires' must be a positive number of seconds up to {MAX_EXPIRY_SECONDS} (ten years)")
    return seconds


def check_rpm(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_RPM:
        raise BadRequest(f"'rpm' must be a whole number of requests per minute from 1 to {MAX_RPM}")
    return value


def parse_rpm(text: str) -> int | None:
    """The rpm of a form field ("" for none)."""
    text = text.strip()
    if not text:
        return None
    if _WHOLE.fullmatch(text) is None:
        raise BadRequest(f"requests per minute must be a whole number from 1 to {MAX_RPM}")
    return check_rpm(int(text))


def check_name(name: str) -> str:
    if len(name) > MAX_TOKEN_NAME or not name.isprintable():
        raise BadRequest(f"a token's name is at most {MAX_TOKEN_NAME} printable characters")
    return name


def check_glob_count(globs: tuple[str, ...] | list[str]) -> None:
    if len(globs) > MAX_GLOBS:
        raise BadRequest(f"a model allow-list holds at most {MAX_GLOBS} globs")


def glob_within(glob: str, makers: tuple[str, ...]) -> bool:
    """Whether every model ``glob`` allows is allowed by ``makers`` too (sound, not complete: see above)."""
    lowered = glob.lower()
    if "*" not in lowered and "?" not in lowered:
        return glob_allows(makers, lowered)
    for maker in (m.lower() for m in makers):
        if lowered == maker:
            return True
        prefix = maker[:-1]
        if maker.endswith("*") and "*" not in prefix and "?" not in prefix and lowered.startswith(prefix):
            return True
    return False


@dataclass(frozen=True)
class Grant:
    models: tuple[str, ...]
    rpm: int | None
    expires_at: float | None


def within_maker(maker: Identity, wanted: Grant, never: bool) -> Grant:
    """The new token's bounds given the token making it (``never``: an expiry of "never" was asked for)."""
    models, rpm, expires_at = wanted.models, wanted.rpm, wanted.expires_at
    if maker.models:
        beyond = [glob for glob in models if not glob_within(glob, maker.models)]
        if beyond:
            raise Forbidden(
                f"a token cannot give models beyond its own ({', '.join(maker.models)}): {', '.join(beyond)}"
            )
        models = models or maker.models
    if maker.rpm is not None:
        if rpm is not None and rpm > maker.rpm:
            raise Forbidden(f"a token cannot give a higher rate than its own {maker.rpm} requests per minute")
        rpm = maker.rpm if rpm is None else rpm
    if maker.expires_at is not None:
        if never or (expires_at is not None and expires_at > maker.expires_at):
            raise Forbidden("a token cannot give an expiry later than its own")
        expires_at = maker.expires_at if expires_at is None else expires_at
    return Grant(models, rpm, expires_at)
