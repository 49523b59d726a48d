"""The boundary between the lifecycle and whatever runs llama-server (processes now, containers later).

A runtime starts a backend from a ``LaunchSpec``, stops it, tells when it exits, and lists what it left
running so a restarted controller can adopt or remove it. It never decides *when*: that is the
lifecycle's job. Blocking calls (SDKs, file system scans) must run off the event loop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one llama-server for one model, host and port excepted."""

    model: str  # canonical model name: the identity used for adoption, logs and pid files
    argv: tuple[str, ...]  # binary first; never a shell string
    env: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""  # file identity (size, mtime) so a replaced model file is not adopted
    labels: Mapping[str, str] = field(default_factory=dict)  # kept with the backend, read back on adoption

    @property
    def spec_hash(self) -> str:
        """Stable digest of what would run: a backend with another hash is not adopted."""
        payload = json.dumps([self.model, self.argv, sorted(self.env.items()), self.fingerprint])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Backend:
    """One running llama-server as the runtime sees it."""

    model: str
    url: str  # base URL, e.g. http://127.0.0.1:40123
    handle: str  # runtime-specific id: a pid, a container id
    spec_hash: str
    started_at: float  # wall clock, seconds since the epoch
    adopted: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitInfo:
    code: int | None  # None when the runtime cannot know (adopted process)
    reason: str


class Runtime(Protocol):
    """What the lifecycle needs from a way of running llama-server."""

    name: str

    async def start(self, spec: LaunchSpec) -> Backend:
        """Launch and return at once (readiness is the lifecycle's concern); raise BackendStartFailed."""

    async def stop(self, backend: Backend, timeout: float) -> None:
        """Ask politely (SIGTERM), then force (SIGKILL) after ``timeout`` seconds; idempotent."""

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        """Return when the backend has exited, for whatever reason."""

    async def list_managed(self) -> list[Backend]:
        """Backends this runtime started earlier (possibly by a previous controller) and still runs."""

    async def close(self) -> None:
        """Release the runtime's own resources (not the backends)."""
