"""The owner task of a ManagedModel: the only code that changes a model's state.

``ModelOwner`` holds the transitions; ``ManagedModel`` (model.py) adds the intents callers use and the
views they read. They are one object: see model.py's docstring for the goal table and the invariants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from common.background import cancel_and_wait
from common.errors import (
    BackendCrashed,
    BackendStartFailed,
    LlamaControllerError,
    ModelStopping,
    ShuttingDown,
    StartupTimeout,
)
from controller.catalog.requirements import ModelPolicy, Requirements
from controller.lifecycle.health import watch_liveness
from controller.lifecycle.state import ALLOWED, Goal, State, backoff_delay, check_transition, fresh
from controller.lifecycle.usage import KEEP_ALIVE_LABEL, Usage, keep_alive_label, kept_keep_alive
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, Runtime
from controller.runtime.logs import LogBook, log_hint
from controller.runtime.watching import Backoff

log = logging.getLogger("controller.lifecycle.model")  # one object with ManagedModel, so one logger

START_POLL_INTERVAL = 0.02  # seconds between /health polls while loading: adds ≤ 20 ms to a load
PROBE_TIMEOUT = 2.0
STABLE_AFTER = 30.0  # a backend that ran this long resets the failure count (no backoff next time)
STOP_RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # between tries of a stop the runtime could not confirm
EXIT_WATCH_GRACE = 2.0  # seconds a confirmed stop waits for the exit watch to see it too
CLOSE_STOP_TRIES = 3  # at shutdown: a backend still not stopped is left to the next controller's first pass

Probe = Callable[[Backend, float], Awaitable[bool]]
SpecFactory = Callable[[Requirements], LaunchSpec]
Publish = Callable[[dict[str, Any]], None]


class ModelOwner:
    # Set by ManagedModel.__init__; declared here for the type checker.
    name: str
    label: str
    policy: ModelPolicy
    _runtime: Runtime
    _make_spec: SpecFactory
    _probe: Probe
    _logbook: LogBook
    _publish: Publish
    _state: State
    _goal: Goal
    _keep_on_close: bool
    _backend: Backend | None
    _gone: asyncio.Task[ExitInfo] | None
    _liveness: asyncio.Task[None] | None
    _unhealthy: str | None  # why the backend is taken for dead while its runtime may still run it
    stop_error: str | None  # why the last try to stop the backend failed, while it is tried again
    stop_failures: int  # failed tries to stop a backend, over the model's life (a metric)
    _adoptee: Backend | None
    _running: Requirements
    _wanted: Requirements
    _ready_waiters: list[tuple[Requirements, asyncio.Future[Backend]]]  # each request's needs, its waiter
    _stop_waiters: list[asyncio.Future[None]]
    _wake: asyncio.Event
    _usage: Usage
    _kept_keep_alive: float  # the keep_alive kept with the current backend (what an adopter would restore)
    _ready_since: float
    last_error: LlamaControllerError | None
    failures: int
    _retry_at: float
    _failed_with: Requirements | None  # what the last failed backend was asked for: the backoff is for that
    load_duration: float
    starts: int

    def _restart_pending(self) -> bool:
        return not self._wanted.satisfied_by(self._running)

    def _set_state(self, new: State, error: LlamaControllerError | None = None) -> None:
        check_transition(self._state, new)
        old, self._state = self._state, new
        if error is not None:
            self.last_error = fresh(error)  # kept through the backoff: it must hold no request's frames
        log.info("model %s: %s → %s%s", self.name, old, new, f" ({error.message})" if error else "")
        event = {
            "type": "model_state",
            "model": self.name,
            "from": str(old),
            "state": str(new),
            "error": error.message if error else None,
            "time": time.time(),
        }
        if new is State.READY:
            event["load_seconds"] = self.load_duration  # 0 for a backend adopted from an earlier controller
        self._publish(event)

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
        await cancel_and_wait(self._liveness)
        await self._kill()
        if State.FAILED in ALLOWED[self._state]:
            error = LlamaControllerError(f"model '{self.label}': internal error, see the server log")
            self._fail(error, 0.0, wanted=self._running)
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
            delay = self._backoff_left()
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
            backend = replace(await self._runtime.start(spec), api_key=spec.api_key)
        except LlamaControllerError as exc:
            self._start_failed(exc)
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
                if await self._kill():  # what it held (a container, a Deployment) goes with it
                    self._start_failed(self._start_error(gone.result()))
                return
            if time.monotonic() > deadline:
                if not await self._kill():
                    return
                self._start_failed(
                    StartupTimeout(
                        f"model '{self.label}' did not become ready within {self.policy.startup_timeout:g}s "
                        "(defaults.startup_timeout)"
                    )
                )
                return
            await self._sleep(START_POLL_INTERVAL, gone)
        self._become_ready(started)

    def _become_ready(self, started: float) -> None:
        backend = self._backend
        assert backend is not None
        self._unhealthy = None
        self.last_error = self._failed_with = None
        self.load_duration = time.monotonic() - started if started else 0.0
        self._ready_since = time.monotonic()
        # An adopted backend expires as its last controller said (keep_alive -1 stays forever); a new one by
        # the model's default until a request says otherwise.
        kept = kept_keep_alive(backend.labels) if backend.adopted else None
        self._usage.ready(kept)
        self._kept_keep_alive = self.policy.keep_alive if kept is None else kept
        self._set_state(State.READY)
        self._liveness = asyncio.create_task(
            watch_liveness(backend, self._probe, self.policy.health_interval, self._unresponsive),
            name=f"liveness:{self.name}",
        )
        for _, waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(backend)
        self._ready_waiters.clear()

    def _start_error(self, exit_info: ExitInfo) -> BackendStartFailed:
        return BackendStartFailed(f"model '{self.label}' failed to load: {exit_info.reason}{self._log_hint()}")

    def _log_hint(self, last_resort: bool = True) -> str:
        """The backend's own first error line since its last start (the cause, not the aftermath)."""
        return log_hint(self._logbook.tail(self.name, 200), last_resort)

    def backs_off(self, requirements: Requirements) -> bool:
        """Whether a start for ``requirements`` waits out the backoff: only if it asks for all that failed."""
        return self._failed_with is not None and self._failed_with.satisfied_by(requirements)

    def _backoff_left(self) -> float:
        """Seconds before the next start. The backoff is for what failed: requests that all need less (the
        oversized one failed, they ask for the usual) start at once. A pinned model's restart always waits."""
        if self._state is not State.FAILED:
            return 0.0
        waiting = [needs for needs, waiter in self._ready_waiters if not waiter.done()]
        if waiting and not self.backs_off(Requirements.merge_all(waiting)):
            return 0.0
        return self._retry_at - time.monotonic()

    def _start_failed(self, error: LlamaControllerError) -> None:
        """A start failed. The requests that asked the most of it (a larger num_ctx, embeddings) may be the
        cause: when others wait that need less, only those get the error and the model starts again with what
        the others need. Either way no later start asks for what failed unless its own requests do: one
        oversized request must not break the model for everyone."""
        tried = self._running
        waiting = [(needs, waiter) for needs, waiter in self._ready_waiters if not waiter.done()]
        needed = Requirements.merge_all(needs for needs, _ in waiting)
        if not tried.satisfied_by(needed):  # it asked for more than anyone waiting needs (the asker left)
            culprits, rest = [], waiting
        else:
            most = max((needs.weight for needs, _ in waiting), default=None)
            culprits = [(needs, waiter) for needs, waiter in waiting if needs.weight == most]
            rest = [(needs, waiter) for needs, waiter in waiting if needs.weight != most]
        if not rest or self._goal is not Goal.RUN:
            self._fail(error, ran_for=0.0, wanted=Requirements())
            return
        self._record_failure(error, ran_for=0.0)
        for _, waiter in culprits:
            waiter.set_exception(fresh(error))
        self._ready_waiters = rest
        self._wanted = Requirements.merge_all(needs for needs, _ in rest)  # the goal stays "run": start again

    def _fail(self, error: LlamaControllerError, ran_for: float, wanted: Requirements) -> None:
        """Record a failed start or a crash; waiters get the error; backoff before the next start, which
        asks for ``wanted`` (and what its own requests need)."""
        self._record_failure(error, ran_for)
        self._reject_ready(error)
        # A pinned model restarts by itself and keeps its slot; others free it and start on demand.
        if self._goal is Goal.RUN:
            self._goal = Goal.RUN if self.policy.pinned else Goal.IDLE
        self._wanted = wanted

    def _record_failure(self, error: LlamaControllerError, ran_for: float) -> None:
        self.failures = 1 if ran_for >= STABLE_AFTER else self.failures + 1
        self._retry_at = time.monotonic() + backoff_delay(self.failures)
        self._failed_with = self._running
        self._backend, self._gone = None, None
        self._set_state(State.FAILED, error)

    def _reject_ready(self, error: LlamaControllerError) -> None:
        for _, waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_exception(fresh(error))  # one object per request: see ``fresh``
        self._ready_waiters.clear()

    async def _serve(self) -> None:
        """While ready: react to a crash, a stop or restart once drained, or the idle expiry."""
        assert self._backend is not None and self._gone is not None
        if self._gone.done() or self._unhealthy is not None:
            reason = self._unhealthy or self._gone.result().reason
            await cancel_and_wait(self._liveness)
            # Taken for dead, released before it reads failed: a failed model holds no slot, so whatever the
            # backend still holds (a GPU, a container) must be gone first. A hung backend is killed here.
            self._set_state(State.STOPPING)
            if not await self._kill():
                return  # shutting down: _close_now takes it from here
            self._fail(
                BackendCrashed(
                    f"model '{self.label}' backend stopped unexpectedly: {reason}{self._log_hint(last_resort=False)}"
                ),
                ran_for=time.monotonic() - self._ready_since,
                wanted=self._running,  # it ran with them: a crash is not theirs to blame
            )
            return
        usage = self._usage
        if usage.keep_alive != self._kept_keep_alive:
            await self._keep_keep_alive(self._backend, usage.keep_alive)
        drained = usage.drained
        now = time.monotonic()
        idle = drained and usage.queued == 0 and not self.policy.pinned and self._goal is Goal.RUN
        expired = idle and usage.expires_at is not None and now >= usage.expires_at
        if drained and self._goal is Goal.STOP:
            await self._stop_backend()
            self._finish_stop()
            return
        if drained and self._restart_pending():
            await self._stop_backend()  # restart with the new flags; the goal stays "run"
            return
        if expired:
            log.info("model %s: keep_alive expired", self.name)
            self._goal = Goal.STOP
            return
        timeout = (usage.expires_at - now) if idle and usage.expires_at is not None else None
        await self._sleep(timeout, self._gone)

    async def _keep_keep_alive(self, backend: Backend, seconds: float) -> None:
        """Keep the keep_alive in force with the backend, so that a controller that adopts it after a restart
        keeps to it. Written when it changes, not at each request (an API call on Kubernetes); the idle time
        is not kept, so an adopted backend's idle time counts from its adoption."""
        self._kept_keep_alive = seconds  # once per change, even when it fails: no retry storm on a broken API
        try:
            await self._runtime.keep_labels(backend, {KEEP_ALIVE_LABEL: keep_alive_label(seconds)})
        except LlamaControllerError as exc:
            log.warning("model %s: could not keep its keep_alive with the backend: %s", self.name, exc)

    async def _stop_backend(self) -> None:
        """STARTING or READY → STOPPING → STOPPED, the backend stopped and forgotten. It reads ``stopped`` only
        once the runtime confirms the backend is gone; a stop left undone at shutdown leaves it ``stopping``."""
        self._set_state(State.STOPPING)
        await cancel_and_wait(self._liveness)
        if await self._kill():
            self._set_state(State.STOPPED)

    async def _kill(self) -> bool:
        """Stop the backend until the runtime confirms it is gone; True once it is. The backend stays in the
        books (``backend``, the slot) meanwhile, so nothing that runs is ever forgotten; only at shutdown is it
        given up after CLOSE_STOP_TRIES, for the next controller's first pass to remove."""
        backend, gone = self._backend, self._gone
        if backend is not None and not await self._stop_until_gone(backend):
            return False
        self._backend = self._gone = None
        if gone is not None:  # its exit watch ends with it; one whose event was lost is given up on
            with contextlib.suppress(Exception):
                async with asyncio.timeout(EXIT_WATCH_GRACE):
                    await asyncio.shield(gone)
            await cancel_and_wait(gone)
        return True

    async def _stop_until_gone(self, backend: Backend) -> bool:
        backoff = Backoff(STOP_RETRY_DELAYS)
        while True:
            try:
                await self._runtime.stop(backend, self.policy.stop_timeout)
            except Exception as exc:  # an engine timeout, an API error, a bug in a runtime: try again
                error = exc.message if isinstance(exc, LlamaControllerError) else exc.__class__.__name__
                self.stop_error = error
                self.stop_failures += 1
                closing = self._goal is Goal.CLOSE
                if closing and backoff.failures + 1 >= CLOSE_STOP_TRIES:
                    log.error(
                        "model %s: its backend %s could not be stopped (%s); left for the next controller to "
                        "remove at its start",
                        self.name,
                        backend.handle,
                        error,
                    )
                    return False
                delay = backoff.next_delay()
                log.warning(
                    "model %s: stopping its backend %s failed (%s); trying again in %gs",
                    self.name,
                    backend.handle,
                    error,
                    delay,
                )
                self._publish(
                    {
                        "type": "model_stop_failed",
                        "model": self.name,
                        "state": str(self._state),
                        "handle": backend.handle,
                        "error": error,
                        "failures": backoff.failures,
                        "retry_in": delay,
                        "time": time.time(),
                    }
                )
                await self._pause(min(delay, 0.5) if closing else delay)
                continue
            if self.stop_error is not None:
                log.info(
                    "model %s: its backend %s is stopped, %d tries failed before",
                    self.name,
                    backend.handle,
                    backoff.failures,
                )
            self.stop_error = None
            return True

    async def _pause(self, delay: float) -> None:
        """``delay`` seconds, cut short only by a shutdown (requests wake the owner all the time: they must not
        turn a backoff into a storm). The caller reads the goal again afterwards, so no intent is lost."""
        until = time.monotonic() + delay
        while self._goal is not Goal.CLOSE and (left := until - time.monotonic()) > 0:
            self._wake.clear()
            await self._sleep(left)

    async def _close_now(self) -> None:
        self._reject_ready(ShuttingDown("the server is shutting down"))
        await cancel_and_wait(self._liveness)
        if self._state is State.READY and self._keep_on_close:
            # It stays ready in the books: it runs on, and "stopped" would be untrue to the last event anyone saw.
            log.info("model %s: leaving its backend running for the next controller to adopt", self.name)
            await cancel_and_wait(self._gone)
        elif self._state in (State.STARTING, State.READY, State.STOPPING):
            if self._state is not State.STOPPING:
                self._set_state(State.STOPPING)
            if await self._kill():
                self._set_state(State.STOPPED)
        elif self._state is State.FAILED:
            self._set_state(State.STOPPED)
        self._resolve_stopped()

    def _finish_stop(self) -> None:
        self._goal = Goal.IDLE
        self._usage.stopped()
        self._wanted = Requirements()
        self._reject_ready(ModelStopping(f"model '{self.label}' was unloaded while the request waited"))
        self._resolve_stopped()

    def _resolve_stopped(self) -> None:
        for waiter in self._stop_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._stop_waiters.clear()

    async def _unresponsive(self, backend: Backend, misses: int) -> None:
        """The liveness watch gave up on ``backend``: the owner stops it (until it is gone) as a crash."""
        self.lost(backend, f"health check failed {misses} times in a row")

    def lost(self, backend: Backend, reason: str) -> None:
        """``backend`` is taken for dead (it stopped answering, or its runtime no longer lists it): the owner
        stops what may remain of it and fails the model as after a crash. Ignored for another backend."""
        current = self._backend
        if self._state is State.READY and current is not None and current.handle == backend.handle:
            if self._unhealthy is not None:
                return
            self._unhealthy = reason
            log.warning("model %s: %s; stopping its backend %s", self.name, reason, backend.handle)
            self._wake.set()
