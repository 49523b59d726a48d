"""Who is asking, and what a path requires (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Literal

from common.wire import INTERNAL_PREFIX, VERIFY_PATH


class Scope(StrEnum):
    INFERENCE = "inference"
    MODELS = "models:manage"
    ADMIN = "admin"  # implies every other scope
    METRICS = "metrics"


ALL_SCOPES = frozenset(Scope)
OPEN = None  # required_scope() for paths anyone may call
AUTHENTICATED = ""  # required_scope() for paths any known caller may use, whatever its scopes
ROLE_SCOPES: dict[str, frozenset[str]] = {"admin": frozenset({Scope.ADMIN}), "user": frozenset({Scope.INFERENCE})}


@dataclass(frozen=True)
class Identity:
    subject: str  # the user name
    via: Literal["token", "session", "edge", "anonymous"]
    scopes: frozenset[str]
    models: tuple[str, ...] = ()  # glob allow-list; () allows every model
    owner_models: tuple[str, ...] = ()  # the owning user's allow-list, which every token of theirs obeys too
    token_id: str | None = None
    session_hash: str | None = None
    rpm: int | None = None  # a token's own bounds, which any token it makes must keep within
    expires_at: float | None = None

    def has(self, scope: str) -> bool:
        return scope == AUTHENTICATED or Scope.ADMIN in self.scopes or scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def allows_model(self, name: str) -> bool:
        """Globs match the catalog name, case-insensitively (``gemma3*``, ``llama3.2:3b``); a token's list and
        its owner's list must both allow it."""
        return glob_allows(self.models, name) and glob_allows(self.owner_models, name)


def glob_allows(globs: tuple[str, ...], name: str) -> bool:
    if not globs:
        return True
    lowered = name.lower()
    # "x" and "x:latest" are one model: a glob for either spelling matches both.
    candidates = {lowered, lowered if ":" in lowered else f"{lowered}:latest", lowered.removesuffix(":latest")}
    return any(fnmatchcase(candidate, glob.lower()) for glob in globs for candidate in candidates)


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs; ``OPEN`` for the few paths that need none. Unknown paths need admin."""
    if path in ("/healthz", "/readyz", "/") or path in ("/auth/login", VERIFY_PATH):
        return OPEN
    if path.startswith(INTERNAL_PREFIX):
        return OPEN  # the gateways' routes check the deployment's shared secret themselves
    if path.startswith(("/api/", "/v1/", "/llama/")):
        return Scope.INFERENCE
    if path.startswith(("/control/v1/models", "/control/v1/events")):
        return Scope.MODELS
    if path.startswith("/control/v1/tokens"):
        return AUTHENTICATED  # users manage their own tokens; the service limits what each may do
    if path == "/ui" or path.startswith("/ui/"):
        return OPEN  # the web page signs its visitors in (and redirects) itself
    if path == "/metrics":
        return Scope.METRICS
    if path in ("/auth/logout", "/auth/session"):
        return AUTHENTICATED
    return Scope.ADMIN
