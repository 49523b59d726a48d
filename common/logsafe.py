"""Client-supplied text made safe for a log line: one line, bounded, nothing a terminal would act on.

A request path with ``%0a`` in it decodes to a newline; written as is, it starts a forged line in the log
(``GET /x\\n2026-01-01 INFO ... login ok``). Everything that is not printable (line breaks, ESC, C1 controls,
U+2028) is written as its Python escape (``\\n``, ``\\x1b``, ``\\u2028``), and a value longer than ``limit``
is cut. Printable text, the usual case, is returned as it is after one C-level check.
"""

from __future__ import annotations

import logging
from typing import Any

LIMIT = 512
_CUT = "…"


def loggable(value: object, limit: int | None = LIMIT) -> str:
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + _CUT
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def loggable_field(value: object, limit: int | None = LIMIT) -> str:
    """A client's value as one field of a ``key=value`` line: spaces escaped too (``\\x20``), so a path or a
    model name cannot add fields of its own (``/x%20status=200%20client=203.0.113.9``)."""
    text = loggable(value, limit)
    return text.replace(" ", "\\x20") if " " in text else text


class OneLineFormatter(logging.Formatter):
    """Every message as one line, whatever it was built from: the safety net under the values each log call
    escapes itself. A traceback still takes lines of its own, each marked with ``  | `` (its last line quotes
    the exception's message, which may carry a client's text): no line of the log can pass for an entry."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = loggable(record.message, None)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _marked(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _marked(super().formatStack(stack_info))


def _marked(text: str) -> str:
    return "\n".join("  | " + loggable(line, None) for line in text.split("\n"))
