"""One model, one owner task: every state transition happens in ``ManagedModel._run``.

Callers state an intent — the model's ``goal`` — and never test the state themselves. The owner task makes
the state follow the goal:

    goal    meaning                                      set by
    ------  -------------------------------------------  -----------------------------------------------
    idle    nothing asked: stay stopped (or failed)      a finished stop; a failed start (unpinned)
    run     have a ready backend; holds an admission     the supervisor's admission (``reserve``), an
            slot while set                               adoption, a pinned model's failure
    stop    stop once in-flight requests have drained    ``stop()`` (unload, eviction), keep_alive expiry
    close   shutdown: stop (or keep) the backend, end    ``close()``
            the owner task

``lease()`` is the one way to use the model: it counts the request against the bounded queue, asks for
admission, waits for a ready backend that meets the request's requirements, and holds it for the block.

Invariants, enforced where noted:
- Exactly one start for N concurrent callers: waiters queue on ``_ready_waiters``; only ``_run`` starts.
- The backend is recorded the moment the runtime returns it (``_start``), so a stop or shutdown during the
  load stops it: nothing a runtime started is ever lost.
- A model with in-flight requests is never stopped by expiry, eviction or unload (``_serve`` waits for
  ``_in_flight == 0``); only a crash or shutdown ends it under them.
- While a restart for new requirements is pending (embeddings, a larger context), no new request is
  leased to the old backend (``_usable``): they queue for the new one, so the drain always completes.
- keep_alive follows Ollama: the last request *scheduled* onto the backend decides the idle expiry.
- ``_take`` re-checks everything synchronously: between the owner resolving a waiter and the waiter
  running, the owner may have begun a stop; such a lease is refused and the caller asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
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
from controller.lifecycle.requirements import NOTHING_SPECIAL, ModelPolicy, Requirements
from controller.lifecycle.state import ALLOWED, OCCUPYING, State, check_transition
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, Runtime
from controller.runtime.logs import START_MARKER, LogBook
from proxy.directory import LiveState

log = logging.getLogger(__name__)

START_POLL_INTERVAL = 0.02  # seconds between /health polls while loading: adds ≤ 20 ms to a load
PROBE_TIMEOUT = 2.0
UNHEALTHY_AFTER = 3  # consecutive failed liveness probes
STABLE_AFTER = 30.0  # a backend that ran this long resets the failure count (no backoff next time)
MAX_BACKOFF = 30.0


class Goal(StrEnum):
    IDLE = "idle"
    RUN = "run"
    STOP = "stop"
    CLOSE = "close"


Probe = Callable[[Backend, float], Awaitable[bool]]
SpecFactory = Callable[[Requirements], LaunchSpec]
Publish = Callable[[dict[str, Any]], None]
Admit = Callable[[], Awaitable[None]]

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


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has really ended (a cancelled task still runs until it yields)."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class ManagedModel:
    """See the module docstring: intents outside, one owner task inside."""

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
        self._goal = Goal.IDLE
        self._keep_on_close = False
        self._backend: Backend | None = None
        self._gone: asyncio.Task[ExitInfo] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._unhealthy: str | None = None
        self._adoptee: Backend | None = None
        self._running = Requirements()  # what the current backend was started with
        self._wanted = Requirements()  # what requests since the last stop asked for

        self._ready_waiters: list[asyncio.Future[Backend]] = []
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

        self._in_flight = 0
        self._queued = 0
        self._slots = asyncio.Semaphore(policy.max_concurrent)
        self._last_used = 0.0
        self._keep_alive = policy.keep_alive  # of the last request scheduled (Ollama's rule)
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
        """True while the model counts against ``max_loaded_models`` (admitted, loading, loaded, stopping)."""
        return self._goal is Goal.RUN or self._state in OCCUPYING

    @property
    def requirements(self) -> Requirements:
        return self._running

    def _restart_pending(self) -> bool:
        return not self._wanted.satisfied_by(self._running)

    def _usable(self, backend: Backend | None) -> bool:
        return (
            backend is not None
            and backend is self._backend
            and self._state is State.READY
            and self._goal is Goal.RUN
            and not self._restart_pending()
        )

    def expires_at(self) -> float | None:
        """Wall-clock expiry (seconds since the epoch), None when never or not idle-timed."""
        if self._state is not State.READY or self._expires_at is None:
            return None
        return time.time() + (self._expires_at - time.monotonic())

    def snapshot(self, context_length: int | None = None) -> LiveState:
        backend = self._backend
        failed = self._state is State.FAILED
        return LiveState(
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
            error=self.last_error.message if failed and self.last_error else None,
            embeddings=self._running.embeddings,
            loaded_context_length=context_length if backend else None,
        )

    # ------------------------------------------------------------------ intents

    def reserve(self) -> None:
        """The supervisor's admission granted this model a slot: have it running."""
        if self._goal is Goal.IDLE:
            self._goal = Goal.RUN
            self._wake.set()

    def check_backoff(self) -> None:
        """Refuse at once, holding no slot, while a failed model waits out its backoff."""
        if self._goal is Goal.CLOSE:
            raise ShuttingDown("the server is shutting down")
        if self._state is State.FAILED and self._goal is Goal.IDLE and time.monotonic() < self._retry_at:
            assert self.last_error is not None
            raise self.last_error

    @asynccontextmanager
    async def lease(
        self,
        requirements: Requirements = NOTHING_SPECIAL,
        keep_alive: float | None = None,
        admit: Admit | None = None,
    ) -> AsyncIterator[Backend]:
        """Hold a ready backend meeting ``requirements`` while the block runs (see the module docstring).

        ``admit`` is the supervisor's admission (it may stop other models, then calls ``reserve``);
        alone, the model admits itself. ``keep_alive`` (seconds; None = the model's) sets the expiry."""
        self.check_backoff()
        if self._in_flight + self._queued >= self.policy.max_concurrent + self.policy.queue_depth:
            raise QueueFull(
                f"server busy: model '{self.label}' has {self._in_flight} requests running and "
                f"{self._queued} queued (max_concurrent {self.policy.max_concurrent}, "
                f"queue_depth {self.policy.queue_depth}); try again later"
            )
        self._queued += 1
        try:
            while True:
                await (admit() if admit is not None else self._admit_alone())
                try:
                    backend = await self._ready(requirements)
                except ModelStopping:
                    continue  # unloaded or evicted while we waited: ask for a slot again
                await self._slots.acquire()
                if self._take(backend, keep_alive):
                    break
                self._slots.release()
        finally:
            self._queued -= 1
        try:
            yield backend
        finally:
            self._release()

    async def _admit_alone(self) -> None:
        self.reserve()

    async def _ready(self, requirements: Requirements) -> Backend:
        if self._goal is Goal.CLOSE:
            raise ShuttingDown("the server is shutting down")
        if self._goal is Goal.STOP:
            await self.wait_stopped()
            raise ModelStopping(f"model '{self.label}' was unloaded while the request waited")
        if self._usable(self._backend) and requirements.satisfied_by(self._running):
            assert self._backend is not None
            return self._backend
        if self._goal is not Goal.RUN:  # not admitted (a failure freed the slot): ask for admission again
            raise ModelStopping(f"model '{self.label}' is not loaded")
        waiter: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._ready_waiters.append(waiter)
        self._wanted = self._wanted.merge(requirements)
        self._wake.set()
        return await waiter

    def _take(self, backend: Backend, keep_alive: float | None) -> bool:
        """Start counting a request on ``backend`` if it may still be used (synchronous on purpose)."""
        if not self._usable(backend):
            return False
        self._in_flight += 1
        self._last_used = time.monotonic()
        self._expires_at = None
        self._keep_alive = self.policy.keep_alive if keep_alive is None else keep_alive
        return True

    def _release(self) -> None:
        self._in_flight -= 1
        self._slots.release()
        self._last_used = time.monotonic()
        if self._in_flight == 0:
            seconds = self._keep_alive
            self._expires_at = None if math.isinf(seconds) else self._last_used + seconds
        self._wake.set()

    def request_stop(self) -> None:
        """Ask for a stop after in-flight requests drain (eviction, unload); returns at once."""
        if self._goal is Goal.CLOSE:
            return
        if self._state is State.STOPPED and self._goal is not Goal.RUN:
            return
        self._goal = Goal.STOP
        self._wake.set()

    async def stop(self) -> None:
        """Stop after in-flight requests drain; return once stopped. Idempotent."""
        self.request_stop()
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        if self._goal not in (Goal.STOP, Goal.CLOSE) and self._state is State.STOPPED:
            return
        if self._task.done():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop_waiters.append(waiter)
        self._wake.set()
        await waiter

    def adopt(self, backend: Backend, requirements: Requirements) -> None:
        """Take over a backend a previous controller left running (it answered /health)."""
        if self._state is not State.STOPPED or self._goal is not Goal.IDLE:
            raise LlamaControllerError(f"model '{self.label}' is already managed; cannot adopt another backend")
        self._adoptee = backend
        self._running = self._wanted = requirements
        self._goal = Goal.RUN
        self._wake.set()

    async def close(self, stop_backend: bool = True) -> None:
        """Shutdown: the owner stops the backend (unless it should survive for adoption) and ends."""
        self._keep_on_close = not stop_backend
        self._goal = Goal.CLOSE
        self._wake.set()
        await asyncio.shield(self._task)

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
                if self._goal is Goal.CLOSE:
                    await self._close_now()
                    return
                await self._step()
            except Exception:  # a bug must not kill the owner: log it, fail the model, keep serving
                log.exception("model %s: owner task error", self.name)
                await self._recover_from_bug()

    async def _recover_from_bug(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            with contextlib.suppress(Exception):
                await self._runtime.stop(backend, self.policy.stop_timeout)
        await _cancel(self._liveness)
        if State.FAILED in ALLOWED[self._state]:
            self._fail(LlamaControllerError(f"model '{self.label}': internal error, see the server log"), 0.0)
        await self._sleep(1.0)

    async def _step(self) -> None:
        state, goal = self._state, self._goal
        if state is State.READY:
            await self._serve()
        elif goal is Goal.STOP:
            if state is State.FAILED:
                self._set_state(State.STOPPED)
            self._finish_stop()
        elif goal is Goal.RUN and self._adoptee is not None:
            self._take_over(self._adoptee)
        elif goal is Goal.RUN:
            delay = self._retry_at - time.monotonic() if state is State.FAILED else 0.0
            if delay > 0:
                await self._sleep(delay)
            else:
                await self._start()
        else:
            await self._sleep()

    def _take_over(self, backend: Backend) -> None:
        self._adoptee = None
        self._set_state(State.STARTING)
        self._backend = backend
        self._gone = asyncio.create_task(self._runtime.wait_exit(backend), name=f"exit-watch:{self.name}")
        self._become_ready(started=0.0)

    async def _start(self) -> None:
        self._set_state(State.STARTING)
        self.starts += 1
        started = time.monotonic()
        self._running = self._wanted
        try:
            spec = self._make_spec(self._running)
            backend = await self._runtime.start(spec)
        except LlamaControllerError as exc:
            self._fail(exc, ran_for=0.0)
            return
        # Recorded at once: from here a stop or a shutdown stops this backend (it is never lost).
        self._backend = backend
        self._gone = gone = asyncio.create_task(self._runtime.wait_exit(backend), name=f"exit-watch:{self.name}")
        deadline = started + self.policy.startup_timeout
        while True:
            self._wake.clear()
            if self._goal in (Goal.STOP, Goal.CLOSE):
                await self._stop_backend()
                if self._goal is Goal.STOP:
                    self._finish_stop()
                return
            if await self._probe(backend, PROBE_TIMEOUT):
                break
            if gone.done():
                self._backend = self._gone = None
                self._fail(self._start_error(gone.result()), ran_for=0.0)
                return
            if time.monotonic() > deadline:
                await self._kill()
                self._fail(
                    StartupTimeout(
                        f"model '{self.label}' did not become ready within {self.policy.startup_timeout:g}s "
                        "(defaults.startup_timeout)"
                    ),
                    ran_for=0.0,
                )
                return
            await self._sleep(START_POLL_INTERVAL, gone)
        self._become_ready(started)

    def _become_ready(self, started: float) -> None:
        backend = self._backend
        assert backend is not None
        self._unhealthy = None
        self.load_duration = time.monotonic() - started if started else 0.0
        self._ready_since = self._last_used = time.monotonic()
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
        # A pinned model restarts by itself and keeps its slot; others free it and start on demand.
        if self._goal is Goal.RUN:
            self._goal = Goal.RUN if self.policy.pinned else Goal.IDLE
        self._wanted = self._running

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
            await _cancel(self._liveness)
            self._fail(
                BackendCrashed(f"model '{self.label}' backend stopped unexpectedly: {reason}{self._log_hint()}"),
                ran_for=time.monotonic() - self._ready_since,
            )
            return
        drained = self._in_flight == 0
        if drained and self._goal is Goal.STOP:
            await self._stop_backend()
            self._finish_stop()
            return
        if drained and self._restart_pending():
            await self._stop_backend()  # restart with the new flags; the goal stays "run"
            return
        now = time.monotonic()
        idle = drained and self._queued == 0 and not self.policy.pinned and self._goal is Goal.RUN
        if idle and self._expires_at is not None and now >= self._expires_at:
            log.info("model %s: keep_alive expired", self.name)
            self._goal = Goal.STOP
            return
        timeout = (self._expires_at - now) if idle and self._expires_at is not None else None
        await self._sleep(timeout, self._gone)

    async def _stop_backend(self) -> None:
        """STARTING or READY → STOPPING → STOPPED, the backend stopped and forgotten."""
        self._set_state(State.STOPPING)
        await _cancel(self._liveness)
        await self._kill()
        self._set_state(State.STOPPED)

    async def _kill(self) -> None:
        backend, gone = self._backend, self._gone
        self._backend = self._gone = None
        if backend is not None:
            await self._runtime.stop(backend, self.policy.stop_timeout)
        if gone is not None:
            with contextlib.suppress(Exception):
                await gone

    async def _close_now(self) -> None:
        self._reject_ready(ShuttingDown("the server is shutting down"))
        await _cancel(self._liveness)
        if self._state is State.READY and self._keep_on_close:
            log.info("model %s: leaving its backend running for the next controller to adopt", self.name)
            await _cancel(self._gone)
            self._backend = self._gone = None
            self._set_state(State.STOPPING)
            self._set_state(State.STOPPED)
        elif self._state in (State.STARTING, State.READY):
            await self._stop_backend()
        elif self._state is State.FAILED:
            self._set_state(State.STOPPED)
        self._resolve_stopped()

    def _finish_stop(self) -> None:
        self._goal = Goal.IDLE
        self._expires_at = None
        self._wanted = Requirements()
        self._reject_ready(ModelStopping(f"model '{self.label}' was unloaded while the request waited"))
        self._resolve_stopped()

    def _resolve_stopped(self) -> None:
        for waiter in self._stop_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._stop_waiters.clear()

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
