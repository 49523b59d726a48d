"""Ollama's duration semantics for ``keep_alive`` (pure functions).

A JSON number is seconds (float allowed); a string is a Go duration that needs a unit (``"5m"``,
``"1h30m"``, ``"-1m"``); any negative value (or one over 31 years) means "keep forever"; zero means
"unload right after".
Strings without a unit are rejected exactly as Ollama does (``time: missing unit in duration "-1"``),
because clients that send them are broken against Ollama too and should learn it here.
"""

from __future__ import annotations

import math
import re

FOREVER: float = math.inf
LONGEST = 10.0**9  # seconds (31 years): any longer keep_alive is the same as forever

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_TEXT = 64


class DurationError(ValueError):
    """The value is not a duration Ollama would accept; the message is Ollama's wording."""


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string into seconds; raise DurationError with Go's message otherwise."""
    if len(text) > _MAX_TEXT:
        raise DurationError(f'time: invalid duration "{text[:_MAX_TEXT]}..."')
    body = text
    sign = 1.0
    if body and body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise DurationError(f'time: invalid duration "{text}"')
    position = 0
    total = 0.0
    while position < len(body):
        match = _PART.match(body, position)
        if match is None:
            if re.fullmatch(r"[\d.]+", body[position:]):
                raise DurationError(f'time: missing unit in duration "{text}"')
            raise DurationError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return sign * total


def parse_keep_alive(value: object) -> float:
    """Seconds to keep a model loaded after a request: ``FOREVER`` for negatives, 0 to unload now."""
    if isinstance(value, bool):
        raise DurationError('keep_alive must be a number of seconds or a duration string like "5m"')
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer too large for a float
            seconds = FOREVER
        if math.isnan(seconds):
            raise DurationError('keep_alive must be a number of seconds or a duration string like "5m"')
    elif isinstance(value, str):
        seconds = parse_go_duration(value.strip())
    else:
        raise DurationError('keep_alive must be a number of seconds or a duration string like "5m"')
    # Longer than LONGEST is forever too: an expiry 1e300 s away would overflow the event loop's timer.
    return FOREVER if seconds < 0 or seconds > LONGEST else seconds
