"""What the web page shows, prepared from the app's own views (pure functions: no I/O, no Quart)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from common.directory import ModelInfo
from common.names import canonical

SECRET_KEY = re.compile(r"(password|secret|token|key|credential)", re.IGNORECASE)
REDACTED = "••••••"


def row_id(name: str) -> str:
    """The HTML id (and SSE event name) of a model's row: letters, digits and dashes only."""
    return "model-" + re.sub(r"[^a-z0-9]+", "-", canonical(name)).strip("-")


def size(count: int | None) -> str:
    if not count:
        return "—"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def until(moment: float | None, now: float | None = None) -> str:
    """``in 4 min`` for a future wall-clock time; ``—`` when there is none."""
    if moment is None:
        return "—"
    seconds = max(0, round(moment - (now if now is not None else time.time())))
    if seconds < 60:
        return f"in {seconds} s"
    if seconds < 3600:
        return f"in {seconds // 60} min"
    return f"in {seconds // 3600} h {seconds % 3600 // 60} min"


def ago(moment: float | None, now: float | None = None) -> str:
    if moment is None:
        return "never"
    seconds = max(0, round((now if now is not None else time.time()) - moment))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


@dataclass(frozen=True)
class ModelRow:
    """One dashboard row."""

    id: str
    name: str
    state: str
    backend: str
    memory: str
    gpu: str
    expires: str
    busy: str
    error: str | None
    log_tail: tuple[str, ...]
    loadable: bool
    pinned: bool
    actions: tuple[tuple[str, str], ...]  # (action, button label) that make sense in this state


LOAD, SWITCH, UNLOAD = ("load", "Load"), ("switch", "Switch to"), ("unload", "Unload")
ACTIONS_BY_STATE = {"loading": (UNLOAD,), "ready": (SWITCH, UNLOAD)}  # else: stopped, failed, stopping


def model_row(info: ModelInfo, log_tail: list[str], now: float | None = None) -> ModelRow:
    live = info.live
    return ModelRow(
        id=row_id(info.name),
        name=info.name,
        state=live.state,
        backend=live.backend_url or "—",
        memory=size(info.size),
        gpu="offloaded" if info.gpu_offload else "CPU",
        expires=until(live.expires_at, now) if live.state == "ready" else "—",
        busy=f"{live.in_flight} running, {live.queued} waiting" if live.in_flight or live.queued else "idle",
        error=info.error,
        log_tail=tuple(log_tail) if live.state == "failed" else (),
        loadable=info.loadable,
        pinned=info.pinned,
        actions=ACTIONS_BY_STATE.get(live.state, (LOAD, SWITCH)) if info.loadable else (),
    )


def redact(value: Any, key: str = "") -> Any:
    """The config as shown on the system page: secrets (and passwords inside URLs) replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item, key) for item in value]
    if isinstance(value, str):
        if SECRET_KEY.search(key) and value:
            return REDACTED
        return redact_url(value)
    return value


def redact_url(text: str) -> str:
    """``text`` with the secrets of a URL replaced, found by parsing it as redis-py and urllib do (the userinfo
    ends at the *last* ``@`` of the authority, so a password may contain ``@``; ``?password=`` counts too),
    never by pattern. What is not a URL comes back unchanged."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or "://" not in text:
        return text
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{host}"
    else:
        netloc = parts.netloc
    pairs = []
    for pair in parts.query.split("&") if parts.query else []:
        name, equals, _ = pair.partition("=")
        secret = equals and SECRET_KEY.search(unquote_plus(name))
        pairs.append(f"{name}={REDACTED}" if secret else pair)
    scheme = text[: text.index("://")]  # as written (urlsplit lowers it; urlunsplit drops unix://'s slashes)
    query = "?" + "&".join(pairs) if parts.query else ""
    fragment = "#" + parts.fragment if parts.fragment else ""
    return f"{scheme}://{netloc}{parts.path}{query}{fragment}"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site only (never ``//host``, a scheme, or a backslash)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/ui/"
    if any(ord(c) < 0x20 for c in target):
        return "/ui/"
    return target
