"""One model, one owner task: every state transition happens in ``ManagedModel._run``.

Callers express intent and never test the state themselves:

    state     ensure_ready()                          request_stop()
    --------  --------------------------------------  ------------------------------------------
    stopped   start, wait for ready                    done at once
    starting  join the start in flight                 abort the start (kill), then stopped
    ready     return the backend (restart first when   wait for in-flight requests to drain,
              its requirements changed, after drain)   then stop
    stopping  wait for stopped, raise ModelStopping    join
              (the caller asks for a slot again)
    failed    start again once the backoff allows,     clear the failure: stopped
              else raise the recorded error at once

Invariants, enforced where noted:
- Exactly one start for N concurrent callers: waiters queue on ``_ready_waiters``; only ``_run`` starts.
- A model with in-flight requests is never stopped by expiry, eviction or unload (``_serve`` waits for
  ``_in_flight == 0``); only a crash or shutdown ends it under them.
- ``take_lease`` re-checks readiness synchronously: between the owner resolving a waiter and the
  waiter running, the owner may have begun a stop; such a lease is refused and the caller retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controller.errors import (
    BackendCrashed,
    BackendStartFailed,
    LlamaControllerError,
    ModelStopping,
    QueueFull,
    ShuttingDown,
    StartupTimeout,
)
from controller.lifecycle.state import ALLOWED, OCCUPYING, State, check_transition
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, Runtime
from controller.runtime.logs import START_MARKER, LogBook

log = logging.getLogger(__name__)

START_POLL_INTERVAL = 0.02  # seconds between /health polls while loading: adds ≤ 20 ms to a load
PROBE_TIMEOUT = 2.0
UNHEALTHY_AFTER = 3  # consecutive failed liveness probes
STABLE_AFTER = 30.0  # a backend that ran this long resets the failure count (no backoff next time)
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Requirements:
    """What a request needs from the running backend beyond the model itself (load-time flags)."""

    embeddings: bool = False
    ctx_size: int | None = None  # the effective context per request (see Supervisor._effective)
    ctx_requested: bool = False  # a request asked for it (num_ctx), rather than the config

    def merge(self, other: Requirements) -> Requirements:
        ctx = max(filter(None, (self.ctx_size, other.ctx_size)), default=None)
        return Requirements(
            embeddings=self.embeddings or other.embeddings,
            ctx_size=ctx,
            ctx_requested=self.ctx_requested or other.ctx_requested,
        )

    def satisfied_by(self, running: Requirements) -> bool:
        if self.embeddings and not running.embeddings:
            return False
        return self.ctx_size is None or (running.ctx_size or 0) >= self.ctx_size


@dataclass(frozen=True)
class ModelPolicy:
    """Per-model settings resolved from config (model value, else defaults)."""

    keep_alive: float = 300.0
    startup_timeout: float = 120.0
    health_interval: float = 1.0
    stop_timeout: float = 10.0
    max_concurrent: int = 4
    queue_depth: int = 512
    pinned: bool = False


@dataclass(frozen=True)
class Snapshot:
    """A model's live state for the APIs; the defaults describe a model no request has touched yet."""

    state: str = str(State.STOPPED)
    backend_url: str | None = None
    handle: str | None = None
    adopted: bool = False
    in_flight: int = 0
    queued: int = 0
    expires_at: float | None = None  # wall clock
    load_duration: float = 0.0
    starts: int = 0
    failures: int = 0
    error: str | None = None
    embeddings: bool = False


Probe = Callable[[Backend, float], Awaitable[bool]]
SpecFactory = Callable[[Requirements], LaunchSpec]
Publish = Callable[[dict[str, Any]], None]


_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([A-Z]) ")


def log_hint(lines: list[str]) -> str:
    """``": <first error line>"`` from llama-server's log since the last start marker, or ``""``."""
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(START_MARKER):
            lines = lines[index + 1 :]
            break
    errors = [line for line in lines if (m := _LOG_PREFIX.match(line)) and m.group(1) == "E"]
    errors = errors or [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    chosen = errors[0] if errors else (lines[-1] if lines else "")
    chosen = _LOG_PREFIX.sub("", chosen).strip()
    return f": {chosen[:300]}" if chosen else ""


def backoff_delay(failures: int) -> float:
    """Seconds before the next start after ``failures`` consecutive failures: 0, 0, 1, 2, 4, ... 30."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 2), MAX_BACKOFF)


class ManagedModel:
    """See the module docstring: intent methods outside, one owner task inside."""

    def __init__(
        self,
        name: str,
        policy: ModelPolicy,
        runtime: Runtime,
        make_spec: SpecFactory,
        probe: Probe,
        logbook: LogBook,
        publish: Publish,
        label: str | None = None,
    ) -> None:
        self.name = name
        self.label = label or name  # the catalog's spelling, for messages
        self.policy = policy
        self._runtime = runtime
        self._make_spec = make_spec
        self._probe = probe
        self._logbook = logbook
        self._publish = publish

        self._state = State.STOPPED
        self._backend: Backend | None = None
        self._gone: asyncio.Task[ExitInfo] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._unhealthy: str | None = None
        self._running_requirements = Requirements()
        self._requirements = Requirements()

        self._want_running = False
        self._stop_requested = False
        self._closing = False
        self._reserved = False
        self._ready_waiters: list[asyncio.Future[Backend]] = []
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

        self._in_flight = 0
        self._queued = 0
        self._slots = asyncio.Semaphore(policy.max_concurrent)
        self._last_used = 0.0
        self._expires_at: float | None = None  # monotonic; None = never
        self._ready_since = 0.0

        self.last_error: LlamaControllerError | None = None
        self.failures = 0
        self._retry_at = 0.0
        self.load_duration = 0.0
        self.starts = 0
        self._task = asyncio.create_task(self._run(), name=f"model-owner:{name}")

    # ------------------------------------------------------------------ read-only views

    @property
    def state(self) -> State:
        return self._state

    @property
    def backend(self) -> Backend | None:
        return self._backend

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def last_used(self) -> float:
        return self._last_used

    @property
    def holds_slot(self) -> bool:
        """True while the model counts against ``max_loaded_models`` (admitted, loading, loaded)."""
        return self._reserved or self._state in OCCUPYING

    @property
    def requirements(self) -> Requirements:
        return self._running_requirements

    def expires_at(self) -> float | None:
        """Wall-clock expiry (seconds since the epoch), None when never or not idle-timed."""
        if self._state is not State.READY or self._expires_at is None:
            return None
        return time.time() + (self._expires_at - time.monotonic())

    def snapshot(self) -> Snapshot:
        backend = self._backend
        return Snapshot(
            state=str(self._state),
            backend_url=backend.url if backend and self._state is State.READY else None,
            handle=backend.handle if backend else None,
            adopted=bool(backend and backend.adopted),
            in_flight=self._in_flight,
            queued=self._queued,
            expires_at=self.expires_at(),
            load_duration=round(self.load_duration, 4),
            starts=self.starts,
            failures=self.failures,
            error=self.last_error.message if self._state is State.FAILED and self.last_error else None,
            embeddings=self._running_requirements.embeddings,
        )

    # ------------------------------------------------------------------ intents

    def reserve(self) -> None:
        """Called by the supervisor's admission once a slot is granted to this model."""
        self._reserved = True

    async def ensure_ready(self, requirements: Requirements = Requirements()) -> Backend:
        """Return a ready backend that meets ``requirements``; start or restart as needed."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._stop_requested:
            await self._wait_stopped()
            raise ModelStopping(f"model '{self.label}' was unloaded while the request waited")
        backend = self._backend
        if self._state is State.READY and backend is not None and requirements.satisfied_by(self._running_requirements):
            return backend
        if self._state is State.FAILED and not self._want_running and time.monotonic() < self._retry_at:
            assert self.last_error is not None
            raise self.last_error
        waiter: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._ready_waiters.append(waiter)
        self._requirements = self._requirements.merge(requirements)
        self._want_running = True
        self._wake.set()
        return await waiter

    async def request_stop(self) -> None:
        """Stop after in-flight requests drain; return once stopped. Idempotent."""
        if self._state is State.STOPPED and not self._want_running and not self._reserved:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop_waiters.append(waiter)
        self._stop_requested = True
        self._wake.set()
        await waiter

    async def _wait_stopped(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop_waiters.append(waiter)
        self._wake.set()
        await waiter

    def admit_request(self) -> None:
        """Count a new request for this model; refuse it when the bounded queue is full (503)."""
        if self._in_flight + self._queued >= self.policy.max_concurrent + self.policy.queue_depth:
            raise QueueFull(
                f"server busy: model '{self.label}' has {self._in_flight} requests running and "
                f"{self._queued} queued (max_concurrent {self.policy.max_concurrent}, "
                f"queue_depth {self.policy.queue_depth}); try again later"
            )
        self._queued += 1

    def leave_queue(self) -> None:
        self._queued -= 1

    async def acquire_slot(self) -> None:
        await self._slots.acquire()

    def release_slot(self) -> None:
        self._slots.release()

    def take_lease(self, backend: Backend) -> bool:
        """Start counting a request on ``backend`` if it is still the ready one (synchronous on purpose)."""
        if self._state is not State.READY or self._backend is not backend or self._stop_requested:
            return False
        self._in_flight += 1
        self._last_used = time.monotonic()
        self._expires_at = None
        return True

    def release(self, keep_alive: float | None) -> None:
        """A request ended: its keep_alive (else the model's) sets the idle expiry."""
        self._in_flight -= 1
        self._slots.release()
        self._last_used = time.monotonic()
        seconds = self.policy.keep_alive if keep_alive is None else keep_alive
        if self._in_flight == 0:
            self._expires_at = None if math.isinf(seconds) else self._last_used + seconds
        self._wake.set()

    async def adopt(self, backend: Backend, requirements: Requirements) -> None:
        """Take over a backend a previous controller left running (it answered /health)."""
        self._set_state(State.STARTING)
        self._running_requirements = self._requirements = requirements
        self._reserved = True
        self._become_ready(backend, asyncio.create_task(self._runtime.wait_exit(backend)), started=0.0)
        self._wake.set()

    async def close(self, stop_backend: bool = True) -> None:
        """Shutdown: stop the backend (unless it should survive for adoption) and end the owner task."""
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._reject_ready(ShuttingDown("the server is shutting down"))
        if self._liveness is not None:
            self._liveness.cancel()
        if stop_backend and self._backend is not None:
            await self._runtime.stop(self._backend, self.policy.stop_timeout)
        if self._gone is not None:
            self._gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, LlamaControllerError):
                await self._gone
        self._resolve_stopped()

    # ------------------------------------------------------------------ the owner task

    def _set_state(self, new: State, error: LlamaControllerError | None = None) -> None:
        check_transition(self._state, new)
        old, self._state = self._state, new
        if error is not None:
            self.last_error = error
        log.info("model %s: %s → %s%s", self.name, old, new, f" ({error.message})" if error else "")
        self._publish(
            {
                "type": "model_state",
                "model": self.name,
                "from": str(old),
                "state": str(new),
                "error": error.message if error else None,
                "time": time.time(),
            }
        )

    async def _sleep(self, timeout: float | None = None, *also: asyncio.Future[Any]) -> None:
        """Wait for a wake-up, one of ``also`` to finish, or ``timeout`` seconds, whichever is first.

        The wake flag is cleared only at the top of each step (``_run``) and poll round (``_start``),
        before the conditions are read, so an intent posted after that is never lost.
        """
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([woken, *also], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the owner: log it, fail the model, keep serving
                log.exception("model %s: owner task error", self.name)
                await self._recover_from_bug()

    async def _recover_from_bug(self) -> None:
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._runtime.stop(self._backend, self.policy.stop_timeout)
        self._stop_liveness()
        if self._state is not State.FAILED and State.FAILED in ALLOWED[self._state]:
            self._fail(LlamaControllerError(f"model '{self.label}': internal error, see the server log"), 0.0)
        await asyncio.sleep(1.0)

    async def _step(self) -> None:
        state = self._state
        if state is State.READY:
            await self._serve()
        elif self._stop_requested:
            if state is State.FAILED:
                self._set_state(State.STOPPED)
            self._finish_stop()
        elif self._want_running:
            delay = self._retry_at - time.monotonic() if state is State.FAILED else 0.0
            if delay > 0:
                await self._sleep(delay)
            else:
                await self._start()
        else:
            await self._sleep()

    async def _start(self) -> None:
        self._set_state(State.STARTING)
        self.starts += 1
        started = time.monotonic()
        self._running_requirements = self._requirements
        try:
            spec = self._make_spec(self._running_requirements)
            backend = await self._runtime.start(spec)
        except LlamaControllerError as exc:
            self._fail(exc, ran_for=0.0)
            return
        gone = asyncio.create_task(self._runtime.wait_exit(backend), name=f"exit-watch:{self.name}")
        deadline = started + self.policy.startup_timeout
        while True:
            self._wake.clear()
            if self._stop_requested or self._closing:
                await self._kill(backend, gone)
                self._set_state(State.STOPPING)
                self._set_state(State.STOPPED)
                self._finish_stop()
                return
            if await self._probe(backend, PROBE_TIMEOUT):
                break
            if gone.done():
                self._fail(self._start_error(gone.result()), ran_for=0.0)
                return
            if time.monotonic() > deadline:
                await self._kill(backend, gone)
                self._fail(
                    StartupTimeout(
                        f"model '{self.label}' did not become ready within {self.policy.startup_timeout:g}s "
                        "(defaults.startup_timeout)"
                    ),
                    ran_for=0.0,
                )
                return
            await self._sleep(START_POLL_INTERVAL, gone)
        self._become_ready(backend, gone, started)

    def _become_ready(self, backend: Backend, gone: asyncio.Task[ExitInfo], started: float) -> None:
        self._backend, self._gone, self._unhealthy = backend, gone, None
        self.load_duration = time.monotonic() - started if started else 0.0
        self._ready_since = time.monotonic()
        self._last_used = self._ready_since
        # Expire even if every waiter went away before the load finished; a lease clears this.
        keep_alive = self.policy.keep_alive
        self._expires_at = None if math.isinf(keep_alive) else self._ready_since + keep_alive
        self._set_state(State.READY)
        self._liveness = asyncio.create_task(self._watch_liveness(backend), name=f"liveness:{self.name}")
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(backend)
        self._ready_waiters.clear()

    def _start_error(self, exit_info: ExitInfo) -> BackendStartFailed:
        return BackendStartFailed(f"model '{self.label}' failed to load: {exit_info.reason}{self._log_hint()}")

    def _log_hint(self) -> str:
        """The backend's own first error line since its last start (the cause, not the aftermath)."""
        return log_hint(self._logbook.tail(self.name, 200))

    def _fail(self, error: LlamaControllerError, ran_for: float) -> None:
        """Record a failed start or a crash; waiters get the error; backoff before the next start."""
        self.failures = 1 if ran_for >= STABLE_AFTER else self.failures + 1
        self._retry_at = time.monotonic() + backoff_delay(self.failures)
        self._backend, self._gone = None, None
        self._set_state(State.FAILED, error)
        self._reject_ready(error)
        self._want_running = self.policy.pinned  # a pinned model restarts by itself; others on demand
        self._reserved = self.policy.pinned
        self._requirements = self._running_requirements

    def _reject_ready(self, error: LlamaControllerError) -> None:
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._ready_waiters.clear()

    async def _serve(self) -> None:
        """While ready: react to a crash, a stop or restart once drained, or the idle expiry."""
        assert self._backend is not None and self._gone is not None
        if self._gone.done():
            info = self._gone.result()
            reason = self._unhealthy or info.reason
            self._stop_liveness()
            self._fail(
                BackendCrashed(f"model '{self.label}' backend stopped unexpectedly: {reason}{self._log_hint()}"),
                ran_for=time.monotonic() - self._ready_since,
            )
            return
        drained = self._in_flight == 0
        if drained and self._stop_requested:
            await self._stop_backend()
            self._finish_stop()
            return
        if drained and not self._requirements.satisfied_by(self._running_requirements):
            await self._stop_backend()  # restart with the new flags; the slot stays reserved
            return
        now = time.monotonic()
        idle = drained and self._queued == 0 and not self.policy.pinned
        if idle and self._expires_at is not None and now >= self._expires_at:
            log.info("model %s: keep_alive expired", self.name)
            self._stop_requested = True
            return
        timeout = (self._expires_at - now) if idle and self._expires_at is not None else None
        await self._sleep(timeout, self._gone)

    async def _stop_backend(self) -> None:
        assert self._backend is not None and self._gone is not None
        self._set_state(State.STOPPING)
        self._stop_liveness()
        await self._kill(self._backend, self._gone)
        self._backend, self._gone = None, None
        self._set_state(State.STOPPED)

    async def _kill(self, backend: Backend, gone: asyncio.Task[ExitInfo]) -> None:
        await self._runtime.stop(backend, self.policy.stop_timeout)
        with contextlib.suppress(Exception):
            await gone

    def _finish_stop(self) -> None:
        self._stop_requested = False
        self._want_running = False
        self._reserved = False
        self._expires_at = None
        self._requirements = Requirements()
        self._reject_ready(ModelStopping(f"model '{self.label}' was unloaded while the request waited"))
        self._resolve_stopped()

    def _resolve_stopped(self) -> None:
        for waiter in self._stop_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._stop_waiters.clear()

    def _stop_liveness(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None

    async def _watch_liveness(self, backend: Backend) -> None:
        """Probe /health while ready; a backend that stops answering is killed, which reads as a crash."""
        misses = 0
        while True:
            await asyncio.sleep(self.policy.health_interval)
            if await self._probe(backend, PROBE_TIMEOUT):
                misses = 0
                continue
            misses += 1
            if misses >= UNHEALTHY_AFTER:
                self._unhealthy = f"health check failed {misses} times in a row"
                log.warning("model %s: %s; killing backend", self.name, self._unhealthy)
                await self._runtime.stop(backend, timeout=1.0)
                return
