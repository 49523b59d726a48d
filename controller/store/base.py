"""The store: users, API tokens, web sessions and audit events — one protocol, two backends.

``sqlite`` (embedded default, one file in the data dir) and ``redis`` (shared by replicas). The same
contract test suite runs against both (tests/store/). Secrets never reach the store: tokens and sessions
are kept as SHA-256 digests of their high-entropy secrets, passwords as argon2 hashes.

Ephemeral state — rate-limit buckets, login-failure counters, one-time nonces — lives in an ``Ephemeral``
next to the store, shared by every process that uses it: a SQLite file beside the store's for the processes of
one host, Redis for replicas.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

Role = Literal["admin", "user"]

# Every stored field is bounded by size, not only the tables by count, so no input can grow the store
# without limit (a 20 MB user name at sign-in once filled the data dir): 10,000 audit events of at most
# about 2.5 KB each (25 MB in all), counter keys of at most 200 characters, and 20 web sessions per user.
AUDIT_KEEP = 10_000
MAX_AUDIT_TEXT = 128  # action, actor, target
MAX_AUDIT_DETAIL = 1024  # the detail as JSON
MAX_COUNTER_KEY = 200
MAX_SESSIONS_PER_USER = 20  # a further sign-in ends the oldest: a user's sessions take bounded room


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    role: Role = "user"
    disabled: bool = False
    created_at: float = 0.0
    models: tuple[str, ...] = ()  # glob allow-list for the user and every token it owns; empty: every model


@dataclass(frozen=True)
class TokenRecord:
    id: str  # public part of the token (lc_<id>_<secret>)
    name: str
    owner: str
    secret_hash: str  # sha256 hex of the secret part
    scopes: tuple[str, ...]
    models: tuple[str, ...] = ()  # glob allow-list; empty: every model
    expires_at: float | None = None
    revoked: bool = False
    created_at: float = 0.0
    last_used_at: float | None = None
    rpm: int | None = None  # requests per minute; None: unlimited
    made_by: str | None = None  # the token that made this one: revoking that one revokes this one too

    def public(self) -> dict[str, Any]:
        """Everything but the secret's digest, for listings."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "scopes": list(self.scopes),
            "models": list(self.models),
            "expires_at": self.expires_at,
            "revoked": self.revoked,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "rpm": self.rpm,
            "made_by": self.made_by,
        }


@dataclass(frozen=True)
class SessionRecord:
    id_hash: str  # sha256 hex of the cookie value
    user: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class AuditEvent:
    at: float
    action: str  # e.g. "login", "login_failed", "token_created"
    actor: str  # who did it ("cli" for the command line)
    target: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_audit(event: AuditEvent) -> AuditEvent:
    """The event as it is stored: each text field clipped, an oversized detail replaced by its clipped JSON."""
    detail = event.detail
    text = json.dumps(detail)  # ASCII: characters are bytes
    if len(text) > MAX_AUDIT_DETAIL:
        detail = {"truncated": text[: MAX_AUDIT_DETAIL // 2]}  # half: escaping it again at most doubles it
    return replace(
        event,
        action=clip(event.action, MAX_AUDIT_TEXT),
        actor=clip(event.actor, MAX_AUDIT_TEXT),
        target=clip(event.target, MAX_AUDIT_TEXT),
        detail=detail,
    )


def counter_key(key: str) -> str:
    """A counter's key of bounded size: a long one keeps its start and gets a digest of the whole."""
    if len(key) <= MAX_COUNTER_KEY:
        return key
    return f"{key[:64]}#{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


def finite_or_none(value: float | None) -> float | None:
    """A stored time as a finite number; ``inf``/``NaN`` (written before inputs were checked) read as never."""
    return value if value is not None and math.isfinite(value) else None


class Store(Protocol):
    kind: str

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def problem(self) -> str | None:
        """Why the store cannot be trusted now (``/readyz`` asks), or None. Cheap: called on every probe."""

    async def add_user(self, user: User) -> None:
        """Raise Conflict when the name is taken."""

    async def get_user(self, name: str) -> User | None: ...

    async def list_users(self) -> Sequence[User]: ...

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        disabled: bool | None = None,
        role: Role | None = None,
        models: tuple[str, ...] | None = None,
    ) -> User:
        """Change the given fields; raise NotFound for an unknown user."""

    async def add_token(self, token: TokenRecord) -> None: ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> Sequence[TokenRecord]: ...

    async def revoke_token(self, token_id: str) -> bool:
        """True if the token existed (revoking twice is fine)."""

    async def touch_token(self, token_id: str, at: float) -> None:
        """Record the last use (field-level: never undoes a concurrent revocation)."""

    async def add_session(self, session: SessionRecord) -> None:
        """Keeps the user's newest ``MAX_SESSIONS_PER_USER`` sessions; older ones end."""

    async def get_session(self, id_hash: str) -> SessionRecord | None:
        """None for unknown or expired sessions."""

    async def delete_session(self, id_hash: str) -> None: ...

    async def delete_user_sessions(self, user: str) -> None: ...

    async def add_audit(self, event: AuditEvent) -> None: ...

    async def list_audit(self, limit: int = 100) -> Sequence[AuditEvent]:
        """Newest first."""


class Ephemeral(Protocol):
    """Short-lived counters, shared by every process and replica: a limit kept per process would multiply."""

    async def take(self, key: str, per_minute: int) -> float:
        """Token bucket (capacity ``per_minute``, refilled continuously): 0 if allowed, else seconds to wait."""

    async def failures(self, key: str) -> int:
        """Failures recorded for ``key`` within the current window."""

    async def add_failure(self, key: str, window: float) -> int:
        """Record a failure; the count expires ``window`` seconds after the first one."""

    async def clear_failures(self, key: str) -> None: ...

    async def claim_nonce(self, nonce: str, ttl: float) -> bool:
        """True the first time ``nonce`` is seen within ``ttl`` seconds, False on a replay."""

    async def close(self) -> None: ...
