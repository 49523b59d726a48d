"""Taking the lead and what follows it, for the app's lifespan (controller/app.py).

- At start-up one try: a controller that leads at once (always, without leader election) takes office before
  the server answers, as a lone controller always has: a failed start-up fails the process.
- Otherwise it stands by: the server answers (``/healthz`` 200, ``/readyz`` 503 ``standby``) while a campaign
  waits for the lease in the background, then takes office: adoption of what the last leader left, and the rest.
- Once leading, a loss of the lease makes it stop acting at once and end the process with ``EXIT_LEADERSHIP_LOST``
  (the runtime refuses its calls from the moment the lease can no longer be proven: fence.py). It stops no
  backend: the next leader adopts them. Its supervisor (a kubelet, compose's restart policy) starts it again, as a
  standby.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from common.background import cancel_and_wait
from controller.events import LeadershipChanged

if TYPE_CHECKING:
    from controller.services import Services

log = logging.getLogger(__name__)

EXIT_LEADERSHIP_LOST = 3  # the process's exit status after it lost the lead
EXIT_TAKE_OVER_FAILED = 4  # a standby won the lead, then could not start (adopt, list) on the runtime


class Office:
    def __init__(self, services: Services, take_office: Callable[[], Awaitable[None]]) -> None:
        self._services = services
        self._take_office = take_office
        self._campaign: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        """Take office now if the lead is free (raising what start-up raises), else campaign in the background."""
        leadership = self._services.leadership
        if await leadership.try_acquire():
            await self._took()
            return
        log.info("standby (%s leader election): another controller leads; waiting to take over", leadership.kind)
        self._campaign = asyncio.create_task(self._campaign_until_elected(), name="leader-campaign")

    async def _campaign_until_elected(self) -> None:
        await self._services.leadership.acquire()
        try:
            await self._took()
        except Exception as exc:  # no caller to raise to: say it, and end (the next start tries again)
            log.exception("taking over as leader failed")
            self._services.ending.request(EXIT_TAKE_OVER_FAILED, f"taking over as leader failed: {exc}")

    async def _took(self) -> None:
        self._publish("leading", None)
        self._watch = asyncio.create_task(self._step_down_when_lost(), name="leader-watch")
        await self._take_office()

    async def _step_down_when_lost(self) -> None:
        leadership = self._services.leadership
        await leadership.lost.wait()
        self._services.supervisor.abandon()
        reason = leadership.reason or "the lease could not be renewed"
        log.error(
            "lost the lead (%s): this controller no longer acts on the runtime and ends; its backends keep running "
            "for the next leader to adopt",
            reason,
        )
        self._publish("lost", reason)
        self._services.ending.request(EXIT_LEADERSHIP_LOST, f"lost the lead: {reason}")

    def _publish(self, state: str, error: str | None) -> None:
        leadership = self._services.leadership
        event = LeadershipChanged(state, leadership.fencing_token, leadership.identity, error, time.time())
        self._services.events.publish(event)

    async def end(self) -> None:
        """Stop campaigning and watching (the lifespan then closes the supervisor and releases the lease)."""
        await cancel_and_wait(self._campaign)
        await cancel_and_wait(self._watch)
