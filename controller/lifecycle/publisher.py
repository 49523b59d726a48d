"""The controller's side of the directory protocol: the published directory and the gateways' reports.

Gateways follow the directory by long polls (``changes``): the first answer is a snapshot of every model; later
answers hold only the models whose entry changed since the revision the gateway has, and the names removed.
An ``epoch`` names this controller's run: a gateway that saw another epoch (the controller restarted) is sent a
snapshot again. The directory is computed again on every lifecycle event (a state change, a drain), after every
report, and every second; the models folder is looked at again every ``interval`` seconds (a model file added or
removed). A revision is spent only when an entry really changed.
The request counters of a model (in flight, queued) are left out of that comparison: they change all the time and
the gateways count their own.

The same loop forgets gateways silent past their TTL and hands the models the reports (``Supervisor.take_reports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from common.background import cancel_and_wait
from common.errors import Unavailable
from controller.lifecycle.gateways import GatewayReports
from controller.lifecycle.supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_WAIT = 30.0  # the longest a long poll is held (well inside any proxy's idle timeout)


def _comparable(entry: dict[str, Any]) -> str:
    live = {k: v for k, v in entry["info"]["live"].items() if k not in ("in_flight", "queued")}
    return json.dumps({**entry, "info": {**entry["info"], "live": live}}, sort_keys=True)


class DirectoryPublisher:
    def __init__(
        self,
        supervisor: Supervisor,
        reports: GatewayReports,
        interval: float = 5.0,
        ending: asyncio.Event | None = None,
    ) -> None:
        """``ending``: set when the server begins to stop; the long polls held then are answered at once (the
        server waits for open answers before it stops, and would cut them, late, with a 500)."""
        self.supervisor = supervisor
        self.reports = reports
        self.interval = interval
        self.ending = ending or asyncio.Event()
        self.epoch = uuid.uuid4().hex
        self.revision = 0
        self._entries: dict[str, tuple[int, dict[str, Any], str]] = {}  # name → (revision, wire entry, comparable)
        self._removed: dict[str, int] = {}  # name → the revision that removed it
        self.drains: dict[str, tuple[str, int]] = {}  # name → (epoch, revision) that published it draining
        self._changed = asyncio.Condition()
        self._nudged = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._scanned = 0.0  # monotonic: the last look at the models folder
        self.published = asyncio.Event()  # set once the first directory is computed

    async def start(self) -> None:
        """The first directory computed (so that a controller that reads ready has one to give), then the loop."""
        with contextlib.suppress(Exception):  # the loop logs it and tries again
            await self.refresh(rescan=False)
        self._task = asyncio.create_task(self._run(), name="directory-publisher")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def nudge(self, _event: object = None) -> None:
        """Something changed (a bus event): compute the directory again soon."""
        self._nudged.set()

    async def _run(self) -> None:
        while True:
            self._nudged.clear()
            try:
                if self.reports.prune():
                    log.info("a gateway stopped reporting; its requests no longer hold any backend")
                self.supervisor.take_reports(self.reports, self.drains)
                rescan = time.monotonic() - self._scanned >= self.interval
                await self.refresh(rescan)
                if rescan:
                    self._scanned = time.monotonic()
            except Exception:  # a bug must not stop the gateways' directory: log it, try again
                log.exception("computing the directory failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # the gateways' TTL is counted on this clock
                    await self._nudged.wait()

    async def refresh(self, rescan: bool = False) -> None:
        directory = await self.supervisor.directory(rescan, gateways=self.reports.live())
        entries = {entry.info.name: entry.to_wire() for entry in directory}
        changed = False
        for name, wire in entries.items():
            self._removed.pop(name, None)
            comparable = _comparable(wire)
            known = self._entries.get(name)
            if known is None or known[2] != comparable:
                changed = True
                self._entries[name] = (self.revision + 1, wire, comparable)
            else:
                self._entries[name] = (known[0], wire, comparable)  # fresh counters, same revision
        for name in [name for name in self._entries if name not in entries]:
            del self._entries[name]
            self._removed[name] = self.revision + 1
            changed = True
        if changed:
            self.revision += 1
            async with self._changed:
                self._changed.notify_all()
        self._note_drains(entries)
        self.published.set()

    def _note_drains(self, entries: dict[str, dict[str, Any]]) -> None:
        """The revision at which each draining model was first published draining (what gateways must have seen)."""
        for name, wire in entries.items():
            if any(backend["draining"] for backend in wire["backends"]):
                self.drains.setdefault(name, (self.epoch, self._entries[name][0]))
            else:
                self.drains.pop(name, None)
        for name in [name for name in self.drains if name not in entries]:
            del self.drains[name]

    async def take_report(
        self, gateway: str, seq: int, models: Any, revision: tuple[str, int], leaving: bool = False
    ) -> None:
        """A gateway's counts; the directory reflects them (an expiry set, a drain ended) when this returns.
        ``leaving``: its last report, as it stops: it is forgotten at once."""
        self.reports.report(gateway, seq, models, revision)
        if leaving:
            self.reports.forget(gateway)
        self.supervisor.take_reports(self.reports, self.drains)
        await self.refresh()

    async def _change_after(self, revision: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.revision != revision)

    async def changes(self, epoch: str | None, after: int, wait: float) -> dict[str, Any]:
        """The entries changed since revision ``after`` of ``epoch``, waiting up to ``wait`` seconds for one."""
        if not self.published.is_set():  # a standby, or a leader still adopting: the gateways ask again
            raise Unavailable("this controller publishes no directory yet (starting, or standing by)")
        # A gateway that has this epoch's revision 0 holds its (empty) snapshot: it waits like any other.
        full = epoch != self.epoch or after > self.revision
        if not full and after == self.revision and wait > 0 and not self.ending.is_set():
            changed = asyncio.ensure_future(self._change_after(after))
            ending = asyncio.ensure_future(self.ending.wait())
            try:
                await asyncio.wait({changed, ending}, timeout=min(wait, MAX_WAIT), return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                ending.cancel()
        since = 0 if full else after
        return {
            "epoch": self.epoch,
            "revision": self.revision,
            "full": full,
            "models": [wire for revision, wire, _ in self._entries.values() if revision > since],
            "removed": [] if full else [name for name, revision in self._removed.items() if revision > since],
        }
