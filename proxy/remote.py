"""The directory as a gateway process sees it: a copy of the controller's, followed over HTTP.

The copy answers what a request needs alone — names and aliases, the caller's allow-list, a ready backend that
is not draining and runs with what the request needs — so a request for a loaded model never waits on the
controller, and keeps being served while no controller answers (a restart, a failover). Only what the copy
cannot decide goes to the controller: a load, a restart with other flags, a refusal that names a limit, a name
the copy does not know. While no controller answers, such a request waits up to ``load_wait`` seconds for one,
then gets 503 with Retry-After (``ControllerAway``).

The gateway counts its requests per backend and reports them every ``report_interval`` seconds; the controller
stops a draining backend once every live gateway reports it idle. The protocol: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from common import notes
from common.background import cancel_and_wait
from common.directory import Allowed, DirectoryEntry, Lease, ModelInfo, forbidden
from common.errors import (
    ControllerAway,
    LlamaControllerError,
    ModelNotFound,
    QueueFull,
    UpstreamError,
    UpstreamTimeout,
    error_from_wire,
)
from common.names import canonical
from common.upstream import Timeouts, Upstream, bearer
from common.wire import INTERNAL_PREFIX

log = logging.getLogger(__name__)

POLL_WAIT = 25  # seconds a directory long poll may be held by the controller
RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0)  # between tries to reach a controller that does not answer
RETRY_AFTER = 5.0  # what a 503 tells a client while no controller answers
# A controller that cannot act for us yet (a standby, one still adopting, one stopping): as if none answered.
AWAY_CODES = frozenset({"not_leader", "unavailable", "shutting_down"})
LEAVE_WAIT = 2.0  # seconds a stopping gateway gives its last report (leaving) to land
ENSURE_TRIES = 3  # asks for a backend that does not drain, before the last answer is taken as it is
MIN_REPORT_GAP = 0.25  # seconds between reports, however often models turn idle: each costs the controller a look
CONTROLLER_TIMEOUTS = Timeouts(connect=2.0, write=10.0, response=3600.0, stall=3600.0)  # a load may take long
# The whole of an exchange that does not wait for a load or a drain (a report, a resolve, a look at the directory:
# a long poll gets its wait on top): a controller that accepts and never answers (stopped, its node gone without a
# reset) is taken as away, not waited on for the hour a load may take.
EXCHANGE_TIMEOUT = 10.0


def wire_keep_alive(seconds: float | None) -> float | None:
    """A keep_alive as JSON can carry it: forever is -1, as Ollama's clients write it (JSON has no infinity)."""
    return -1 if seconds is not None and math.isinf(seconds) else seconds


class Unreachable(Exception):
    """No controller answered (refused, reset, timed out): the gateway goes on with its copy."""


@dataclass
class _Use:
    """This gateway's requests on one model (what its reports say)."""

    in_flight: dict[str, int] = field(default_factory=dict)  # backend handle → requests
    queued: int = 0
    last_used: float = 0.0  # wall clock
    keep_alive: float | None = None
    keep_alive_at: float = 0.0
    reported_idle: bool = False  # reported once with nothing running since its last request

    def begin(self, handle: str, keep_alive: float | None) -> None:
        self.in_flight[handle] = self.in_flight.get(handle, 0) + 1
        self.last_used = self.keep_alive_at = time.time()
        self.keep_alive = keep_alive
        self.reported_idle = False

    def end(self, handle: str) -> None:
        left = self.in_flight.get(handle, 0) - 1
        if left > 0:
            self.in_flight[handle] = left
        else:
            self.in_flight.pop(handle, None)
        self.last_used = time.time()
        self.reported_idle = False

    @property
    def busy(self) -> bool:
        return bool(self.in_flight) or self.queued > 0

    @property
    def total(self) -> int:
        """Requests running or waiting here."""
        return sum(self.in_flight.values()) + self.queued

    def wire(self) -> dict[str, Any]:
        return {
            "in_flight": dict(self.in_flight),
            "queued": self.queued,
            "last_used": self.last_used,
            "keep_alive": wire_keep_alive(self.keep_alive),
            "keep_alive_at": self.keep_alive_at,
        }


class RemoteDirectory:
    """A ModelDirectory over the controller's internal routes (``controller/api/internal.py``)."""

    def __init__(
        self,
        controller: str,
        secret: str,
        *,
        report_interval: float = 1.0,
        load_wait: float = 30.0,
        gateway_id: str | None = None,
    ) -> None:
        self.controller = controller.rstrip("/")
        self._headers = {**bearer(secret), "content-type": "application/json"}
        self.report_interval = report_interval
        self.load_wait = load_wait
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._client = Upstream(CONTROLLER_TIMEOUTS)  # its own pool: the backends' never waits on a long poll
        self._entries: dict[str, DirectoryEntry] = {}  # catalog key → entry
        self._names: dict[str, str] = {}  # canonical spelling (name or alias) → catalog key
        self._epoch: str | None = None
        self._revision = 0
        self._use: dict[str, _Use] = {}  # catalog name → this gateway's use of it
        self._seq = 0
        self.synced = asyncio.Event()  # a first copy of the directory arrived
        self.controller_answers = False  # the last exchange with the controller went through
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()  # set at each new copy: a load waiting for an absent controller looks again
        self._idle = asyncio.Event()  # a model's last request here ended: report before the interval is up
        self._unreported = False  # a request ended here since the last report (its keep_alive, the expiry)
        self._reporting = asyncio.Lock()  # one report at a time, in the order of their seq

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(), name="directory-follow"),
            asyncio.create_task(self._report_loop(), name="directory-report"),
        ]

    async def close(self) -> None:
        """Stop following; tell the controller this gateway leaves (its requests have ended), so that a drain does
        not wait ``report_ttl`` for it to fall silent."""
        for task in self._tasks:
            await cancel_and_wait(task)
        if self._tasks and self.synced.is_set():
            with contextlib.suppress(Unreachable, LlamaControllerError, TimeoutError):
                async with asyncio.timeout(LEAVE_WAIT), self._reporting:
                    await self._call("POST", f"{INTERNAL_PREFIX}v1/report", {**self.report_body(), "leaving": True})
        await self._client.close()

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, wait: float | None = 0.0
    ) -> Any:
        """One exchange with the controller; its errors come back as the same classes (``error_from_wire``).
        ``wait``: the seconds the controller may take on purpose (a long poll), on top of ``EXCHANGE_TIMEOUT``;
        None for an exchange without a bound (a load, a drain)."""
        data = None if body is None else json.dumps(body).encode()
        bound = None if wait is None else EXCHANGE_TIMEOUT + wait
        try:
            async with asyncio.timeout(bound):
                async with self._client.request(method, f"{self.controller}{path}", data, self._headers) as answer:
                    raw = await answer.read()
                    status = answer.status
        except UpstreamError as exc:
            self.controller_answers = False
            # Not the upstream client's words, which speak of a model's backend.
            cause = exc.__cause__
            why = "no answer in time" if isinstance(exc, UpstreamTimeout) else type(cause or exc).__name__
            raise Unreachable(why) from exc
        except TimeoutError as exc:
            self.controller_answers = False
            raise Unreachable(f"the controller did not answer within {bound:g}s") from exc
        self.controller_answers = True
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            value = {}
        if status != 200:
            if status in (502, 503, 504) and (not isinstance(value, dict) or value.get("code") in AWAY_CODES):
                self.controller_answers = False
                raise Unreachable(f"the controller answered {status}")
            message = value.get("error", f"the controller answered {status}") if isinstance(value, dict) else ""
            code = value.get("code", "internal_error") if isinstance(value, dict) else "internal_error"
            raise error_from_wire(status, str(message), str(code))
        return value

    def _directory(self, wait: int, after: int | None = None) -> str:
        """The path that asks for the directory's changes since ``after`` (default: this copy's revision)."""
        after = self._revision if after is None else after
        return f"{INTERNAL_PREFIX}v1/directory?epoch={self._epoch or ''}&after={after}&wait={wait}"

    async def _follow(self) -> None:
        failures = 0
        while True:
            wait = POLL_WAIT if self.synced.is_set() else 0
            try:
                changes = await self._call("GET", self._directory(wait), wait=wait)
                self.apply(changes)
                failures = 0
            except (Unreachable, LlamaControllerError) as exc:
                if failures == 0:
                    log.warning(
                        "the controller at %s does not answer (%s); serving from the last directory",
                        self.controller,
                        exc,
                    )
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                await asyncio.sleep(delay)

    def apply(self, changes: dict[str, Any]) -> None:
        """A directory answer: a snapshot (``full``) or the entries changed since our revision."""
        if changes["epoch"] == self._epoch and changes["revision"] < self._revision:
            return  # made before the answer applied last (two exchanges were in flight): older than the copy
        entries = {} if changes["full"] else dict(self._entries)
        for name in changes.get("removed", ()):
            entries.pop(canonical(name), None)
        for wire in changes["models"]:
            entry = DirectoryEntry.from_wire(wire)
            entries[canonical(entry.info.name)] = entry
        names = {}
        for key, entry in entries.items():
            names[key] = key
            for alias in entry.info.aliases:
                names.setdefault(canonical(alias), key)
        draining = {b.handle for e in entries.values() for b in e.backends if b.draining}
        if draining - {b.handle for e in self._entries.values() for b in e.backends if b.draining}:
            self._idle.set()  # a backend begins to drain: the controller waits for this gateway's next report
        self._entries, self._names = entries, names
        if changes["epoch"] != self._epoch and self._epoch is not None:
            log.info("following a new controller run (its directory revision %d)", changes["revision"])
        self._epoch, self._revision = changes["epoch"], changes["revision"]
        self.synced.set()
        self._changed.set()
        self._changed = asyncio.Event()

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.report_interval):
                    await self._idle.wait()
            self._idle.clear()
            with contextlib.suppress(Unreachable, LlamaControllerError):
                await self.report()
            await asyncio.sleep(min(self.report_interval, MIN_REPORT_GAP))  # many ends at once: one report

    def report_body(self) -> dict[str, Any]:
        """This gateway's counts: every model with requests, or used since the last report (its last use and
        keep_alive); a model left out has nothing running here."""
        self._seq += 1
        models = {}
        for name, use in list(self._use.items()):
            if use.busy or not use.reported_idle:
                models[name] = use.wire()
                use.reported_idle = not use.busy
            else:  # idle, and said so once: nothing more to say of it
                del self._use[name]
        return {
            "gateway": self.gateway_id,
            "seq": self._seq,
            "epoch": self._epoch,
            "revision": self._revision,
            "models": models,
        }

    async def report(self) -> None:
        async with self._reporting:
            self._unreported = False
            await self._call("POST", f"{INTERNAL_PREFIX}v1/report", self.report_body())

    async def flush(self) -> None:
        """Report now if a request ended here since the last report, and let a report on its way land first (no
        controller answering: nothing to do)."""
        async with self._reporting:
            pass
        if self._unreported:
            with contextlib.suppress(Unreachable, LlamaControllerError):
                await self.report()

    async def _catch_up(self) -> None:
        """Before answering what the models are (``/api/ps``): the controller has this gateway's last requests
        (a keep_alive they set), and the copy has what the controller made of them. Reads the copy as it is
        when no controller answers."""
        if not (self._unreported or self._reporting.locked()):
            return
        with contextlib.suppress(Unreachable, LlamaControllerError):
            await self.flush()
            self.apply(await self._call("GET", self._directory(0)))

    # ------------------------------------------------------------------ the ModelDirectory

    async def _resolve(self, name: str, allowed: Allowed | None) -> str:
        """The catalog's name of the model the caller may use: from the copy, else (a name only the controller
        knows yet) from the controller."""
        key = self._names.get(canonical(name))
        if key is not None:
            model = self._entries[key].info.name
            if allowed is not None and not allowed(model):
                raise forbidden(name)
            notes.note_model(model)
            return model
        if allowed is not None and not allowed(name):
            raise forbidden(name)  # as the controller's rule: existence never leaks outside an allow-list
        try:
            found = str((await self._call("POST", f"{INTERNAL_PREFIX}v1/resolve", {"name": name}))["model"])
        except Unreachable:
            if self.synced.is_set():
                raise ModelNotFound(name) from None  # the copy is all there is to go by
            await self._synced()  # no copy yet: nothing says the name is unknown; wait for one (else 503)
            return await self._resolve(name, allowed)
        if allowed is not None and not allowed(found):
            raise forbidden(name)
        notes.note_model(found)
        return found

    def _use_of(self, name: str) -> _Use:
        use = self._use.get(name)
        if use is None:
            use = self._use[name] = _Use()
        return use

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        num_predict: int | None = None,
        allowed: Allowed | None = None,
    ) -> AsyncIterator[Lease]:
        model = await self._resolve(name, allowed)
        key = canonical(model)
        use = self._use_of(model)
        entry = self._entries.get(key)
        if entry is not None and entry.admits is not None and use.total >= entry.admits:
            raise QueueFull(
                f"server busy: model '{model}' has {use.total} requests running or queued in this gateway (its "
                f"part of max_concurrent + queue_depth over the gateways: {entry.admits}); try again later"
            )
        use.queued += 1
        try:
            held = self._serving(key, embeddings, ctx_size, num_predict)  # never a draining backend
            if held is None:
                held = await self._ensure_undrained(model, keep_alive, embeddings, ctx_size, num_predict)
            use.begin(held.handle, keep_alive)
        finally:
            use.queued -= 1
        try:
            yield held
        finally:
            use.end(held.handle)
            self._unreported = True
            if not use.busy:
                self._idle.set()  # the controller hears at once that the model is idle here (its expiry starts)

    def _draining(self, handle: str) -> bool:
        return any(ref.handle == handle and ref.draining for entry in self._entries.values() for ref in entry.backends)

    def _serving(self, key: str, embeddings: bool, ctx_size: int | None, num_predict: int | None) -> Lease | None:
        """A lease on a ready backend of the model whose catalog key is ``key``, from the copy alone."""
        entry = self._entries.get(key)
        ref = entry.serving(embeddings, ctx_size, num_predict) if entry is not None else None
        if entry is None or ref is None:
            return None
        name = entry.info.name
        return Lease(name, ref.url, 0.0, api_key=ref.api_key, max_predict=entry.max_predict, handle=ref.handle)

    async def _ensure_undrained(
        self, model: str, keep_alive: float | None, embeddings: bool, ctx_size: int | None, num_predict: int | None
    ) -> Lease:
        """``_ensure``, asked again while the copy shows the backend it handed out draining: the controller's answer
        may predate a drain this copy already shows (its hold was given up with a report made before the answer
        came). The last answer is taken as it is."""
        for _ in range(ENSURE_TRIES - 1):
            held = await self._ensure(model, keep_alive, embeddings, ctx_size, num_predict)
            if not self._draining(held.handle):
                return held
        return await self._ensure(model, keep_alive, embeddings, ctx_size, num_predict)

    async def _ensure(
        self, model: str, keep_alive: float | None, embeddings: bool, ctx_size: int | None, num_predict: int | None
    ) -> Lease:
        """The controller loads the model (or restarts it with what the request needs); with no controller
        answering, wait for one (or for a copy of the directory that serves the request) up to ``load_wait``."""
        started = time.monotonic()
        deadline = started + self.load_wait
        body = {
            "gateway": self.gateway_id,
            "model": model,
            "keep_alive": wire_keep_alive(keep_alive),
            "embeddings": embeddings,
            "ctx_size": ctx_size,
            "num_predict": num_predict,
        }
        tries = 0
        while True:
            try:
                answer = await self._call("POST", f"{INTERNAL_PREFIX}v1/ensure", {**body, "seq": self._seq}, wait=None)
            except Unreachable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControllerAway(
                        f"model '{model}' is not loaded and the controller is not answering; try again shortly",
                        RETRY_AFTER,
                    ) from None
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)])):
                        await changed.wait()
                tries += 1
                held = self._serving(canonical(model), embeddings, ctx_size, num_predict)
                if held is not None:
                    return held
                continue
            return Lease(
                str(answer["model"]),
                str(answer["url"]),
                time.monotonic() - started,
                api_key=str(answer["api_key"]),
                max_predict=answer["max_predict"],
                handle=str(answer["handle"]),
            )

    async def unload(self, name: str, allowed: Allowed | None = None) -> None:
        model = await self._resolve(name, allowed)
        try:
            await self._call("POST", f"{INTERNAL_PREFIX}v1/unload", {"model": model}, wait=None)
        except Unreachable:
            raise ControllerAway("the controller is not answering; try the unload again shortly", RETRY_AFTER) from None

    async def _synced(self) -> None:
        """A first copy of the directory, waited for up to ``load_wait``; else ControllerAway (503)."""
        if not self.synced.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.load_wait):
                    await self.synced.wait()
            if not self.synced.is_set():
                raise ControllerAway("the gateway has not reached the controller yet; try again shortly", RETRY_AFTER)

    async def _copy(self) -> dict[str, DirectoryEntry]:
        await self._catch_up()
        await self._synced()
        return self._entries

    async def models(self, allowed: Allowed | None = None) -> Sequence[ModelInfo]:
        entries = await self._copy()
        infos = sorted((entry.info for entry in entries.values()), key=lambda info: info.name)
        return [info for info in infos if allowed is None or allowed(info.name)]

    async def model(self, name: str, allowed: Allowed | None = None) -> ModelInfo:
        await self._copy()
        key = canonical(await self._resolve(name, allowed))
        if key not in self._entries:
            # The controller knows it and the copy not yet (a file added since): take a fresh snapshot at once.
            with contextlib.suppress(Unreachable):
                self.apply(await self._call("GET", self._directory(0, after=0)))
        entry = self._entries.get(key)
        if entry is None:
            raise ModelNotFound(name)
        return entry.info
