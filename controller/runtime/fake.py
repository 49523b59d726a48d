"""An in-memory runtime for unit and HTTP tests of the lifecycle (like ``httpx.MockTransport``).

Behaviour per model is scripted with ``FakeBehaviour``: how long loading takes, whether the start
fails, whether the backend ever becomes healthy. ``crash(model)`` makes a running backend exit.
Its ``probe`` stands in for the HTTP health check. With ``backend_url`` the backends it "starts" are a
scripted llama-server stand-in (tests/support/standin.py), so requests really travel. Every feature is
also proven against the real llama-server in ``tests/integration``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.errors import BackendStartFailed, BackendStopFailed
from controller.runtime.base import Backend, ExitInfo, LaunchSpec

# Port 1 on loopback refuses at once: a request that reaches a fake backend fails fast with UpstreamError.
UNREACHABLE = "http://127.0.0.1:1"


@dataclass
class FakeBehaviour:
    ready_after: float = 0.0  # seconds from start until /health says 200
    fail_start: str | None = None  # runtime.start raises BackendStartFailed with this message
    exit_while_loading: int | None = None  # the process exits with this code before becoming ready
    never_ready: bool = False
    fail_stops: int = 0  # this many stops raise (the backend runs on) before one succeeds


@dataclass
class _Running:
    backend: Backend
    spec: LaunchSpec
    started: float
    exited: asyncio.Future[ExitInfo]
    healthy: bool = True


@dataclass
class FakeRuntime:
    behaviours: dict[str, FakeBehaviour] = field(default_factory=dict)
    leftovers: list[Backend] = field(default_factory=list)  # what list_managed reports at start
    name: str = "fake"
    backend_url: str | None = None  # where requests go (a scripted stand-in); default: a refusing port
    tearing_down: bool = True  # what torn_down answers (keep_backends_on_exit: auto)

    def __post_init__(self) -> None:
        self.starts: list[LaunchSpec] = []
        self.stops: list[str] = []
        self.kept: list[tuple[str, dict[str, str]]] = []  # (handle, labels) of each keep_labels
        self.running: dict[str, _Running] = {}
        self._ids = itertools.count(1)
        self._resync: Callable[[], None] = lambda: None

    def behaviour(self, model: str) -> FakeBehaviour:
        return self.behaviours.get(model, FakeBehaviour())

    async def start(self, spec: LaunchSpec) -> Backend:
        self.starts.append(spec)
        behaviour = self.behaviour(spec.model)
        await asyncio.sleep(0)
        if behaviour.fail_start:
            raise BackendStartFailed(behaviour.fail_start)
        handle = f"fake-{next(self._ids)}"
        url = self.backend_url or f"{UNREACHABLE}/{handle}"
        backend = Backend(spec.model, url, handle, spec.spec_hash, time.time(), labels=dict(spec.labels))
        exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.running[handle] = _Running(backend, spec, time.monotonic(), exited)
        if behaviour.exit_while_loading is not None:
            code = behaviour.exit_while_loading
            asyncio.get_running_loop().call_later(
                min(behaviour.ready_after, 0.01) or 0.01, self._exit, handle, code, f"exited with code {code}"
            )
        return backend

    def _exit(self, handle: str, code: int | None, reason: str) -> None:
        running = self.running.pop(handle, None)
        if running is not None and not running.exited.done():
            running.exited.set_result(ExitInfo(code, reason))

    async def stop(self, backend: Backend, timeout: float) -> None:
        self.stops.append(backend.handle)
        behaviour = self.behaviour(backend.model)
        await asyncio.sleep(0)
        if behaviour.fail_stops > 0 and backend.handle in self.running:
            behaviour.fail_stops -= 1
            raise BackendStopFailed(f"the engine did not stop {backend.handle} in time")
        self._exit(backend.handle, 0, "stopped")

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        running = self.running.get(backend.handle)
        if running is None:
            return ExitInfo(None, "not running")
        return await asyncio.shield(running.exited)

    async def list_managed(self) -> list[Backend]:
        """What runs now: the leftovers (adopted from here on) and what this runtime started."""
        for leftover in self.leftovers:
            backend = replace(leftover, adopted=True)
            exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
            spec = LaunchSpec(backend.model, Path("leftover.gguf"))
            self.running[backend.handle] = _Running(backend, spec, time.monotonic(), exited)
        self.leftovers = []
        await asyncio.sleep(0)
        return [running.backend for running in self.running.values()]

    def on_resync(self, callback: Callable[[], None]) -> None:
        self._resync = callback

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        running = self.running.get(backend.handle)
        if running is not None:
            running.backend = replace(running.backend, labels={**running.backend.labels, **labels})
        self.kept.append((backend.handle, dict(labels)))

    async def logs(self, model: str) -> AsyncIterator[bytes]:
        for spec in self.starts:
            if spec.model == model:
                yield f"started {spec.model} with {' '.join(spec.args)}\n".encode()

    async def torn_down(self) -> bool:
        return self.tearing_down

    async def close(self) -> None:
        return None

    # ---------------------------------------------------------------- test controls

    def crash(self, model: str, code: int = -9) -> None:
        """Make the running backend of ``model`` exit as if killed."""
        for handle, running in list(self.running.items()):
            if running.backend.model == model:
                self._exit(handle, code, f"llama-server was killed (code {code})")

    def hang(self, model: str) -> None:
        """Make the backend of ``model`` stop answering health checks while its process lives on."""
        for running in self.running.values():
            if running.backend.model == model:
                running.healthy = False

    def vanish(self, model: str) -> None:
        """Make the backend of ``model`` disappear without an exit event (a lost event: only a pass sees it)."""
        for handle, running in list(self.running.items()):
            if running.backend.model == model:
                del self.running[handle]

    def resync(self) -> None:
        """As a runtime does after its lost event stream is back."""
        self._resync()

    def alive(self, model: str) -> list[Backend]:
        return [r.backend for r in self.running.values() if r.backend.model == model]

    async def probe(self, backend: Backend, timeout: float) -> bool:
        running = self.running.get(backend.handle)
        if running is None or not running.healthy:
            return False
        behaviour = self.behaviour(backend.model)
        if behaviour.never_ready or behaviour.exit_while_loading is not None:
            return False
        return time.monotonic() - running.started >= behaviour.ready_after
