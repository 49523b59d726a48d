"""What every elected leadership shares: the lease arithmetic (pure) and the keeping of a term (``Term``).

The one safety rule: a leader stops trusting its lease *before* anyone else may take it. A lease written by a
request sent at ``t`` ends no sooner than ``t + duration`` (the server wrote it after ``t``), so its holder trusts
it until ``t + duration - margin`` only; the margin covers clocks that run at slightly different rates. Renewals
come every ``renew_interval`` (at most half the lease, the config says), a failed one is tried again quickly, and
a timer — not the renewing task, which may hang — ends the term when that moment passes without a renewal.

A standby looks again every ``renew_interval``, and also just as the lease it saw should end, so a dead leader's
place is taken at most ``duration + renew_interval`` after its last renewal (``worst_takeover``).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from common.background import cancel_and_wait
from common.errors import LlamaControllerError

log = logging.getLogger(__name__)

MARGIN_SHARE = 0.2  # of the lease: how long before its end the holder stops trusting it
RETRY_SHARE = 0.25  # of the renew interval: how soon a failed renewal is tried again
EXPIRY_SLACK = 0.05  # seconds past the moment a lease should end before a standby looks (a key's expiry is not late)


@dataclass(frozen=True)
class LeaseTiming:
    duration: float  # how long a lease lasts without a renewal
    renew_interval: float

    @property
    def margin(self) -> float:
        return self.duration * MARGIN_SHARE

    def trusted_until(self, sent_at: float) -> float:
        """Until when a lease written by a request sent at ``sent_at`` is trusted by its holder."""
        return sent_at + self.duration - self.margin

    def next_renewal(self, sent_at: float) -> float:
        return sent_at + self.renew_interval

    def retry_in(self, now: float, trusted_until: float) -> float:
        """After a failed renewal: soon, and never past the end of the trust."""
        return max(0.0, min(self.renew_interval * RETRY_SHARE, trusted_until - now))

    def standby_wait(self, ends_in: float | None) -> float:
        """How long a standby waits before it looks again: the renew interval, or less when the lease it saw
        should end sooner (``ends_in``: None when it cannot know, e.g. a lease someone holds forever)."""
        if ends_in is None:
            return self.renew_interval
        return min(self.renew_interval, max(0.0, ends_in) + EXPIRY_SLACK)

    @property
    def worst_takeover(self) -> float:
        """The longest a standby waits for a dead leader's lease: it ends, then the standby's next look."""
        return self.duration + self.renew_interval


@dataclass(frozen=True)
class Claim:
    """The answer to a try to take the lease: the fencing token when it was won; else how soon the lease
    someone else holds should end, when that is known."""

    token: int | None
    ends_in: float | None = None


class Term(ABC):
    """Keeps an elected term: take the lease (``try_acquire``, ``acquire``), renew it in the background (the
    ``renewal`` task), and set ``lost`` when it can no longer be proven; ``release`` hands it over at once.

    One object, one term: a leader that lost its lease does not campaign again (its process ends and starts over
    as a standby). Subclasses say how to claim, extend and give up the lease in their store."""

    kind: str

    def __init__(self, timing: LeaseTiming, identity: str) -> None:
        self.timing = timing
        self.identity = identity
        self.lost = asyncio.Event()
        self.reason: str | None = None  # why the term was lost
        self.fencing_token: int | None = None
        self._trusted_until = 0.0
        self._released = False
        self._renewal: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ what subclasses do

    @abstractmethod
    async def _claim(self) -> Claim:
        """Take the lease if it is free, has ended, or is this holder's; raise a LlamaControllerError when the
        store cannot be reached."""

    @abstractmethod
    async def _extend(self) -> bool:
        """Renew this holder's lease: False when it is no longer this holder's (taken, deleted); raise a
        LlamaControllerError when the store cannot be reached."""

    @abstractmethod
    async def _give_up(self) -> None:
        """Release the lease if it is still this holder's."""

    async def _close_client(self) -> None:
        return None

    # ------------------------------------------------------------------ the term

    @property
    def leading(self) -> bool:
        """Whether this holder may act now: it won, has not lost or released, and its trust has not run out
        (read at the moment of asking, whatever the renewing task is doing)."""
        return (
            self.fencing_token is not None
            and not self.lost.is_set()
            and not self._released
            and _now() < self._trusted_until
        )

    @property
    def renewal(self) -> asyncio.Task[None] | None:
        """The task that renews the lease (cancelled, it renews no more: the term then ends when its trust does)."""
        return self._renewal

    async def try_acquire(self) -> bool:
        """One try: True when this holder leads (now or already)."""
        if self.leading:
            return True
        if self.lost.is_set() or self._released:
            return False
        return (await self._try()).token is not None

    async def acquire(self) -> int:
        """Wait until this holder leads; the fencing token of its term."""
        while not self.leading:
            if self.lost.is_set() or self._released:
                raise RuntimeError("a term that ended is not taken again")
            claim = await self._try()
            if claim.token is None:
                await asyncio.sleep(self.timing.standby_wait(claim.ends_in))
        assert self.fencing_token is not None
        return self.fencing_token

    async def _try(self) -> Claim:
        sent_at = _now()
        try:
            async with asyncio.timeout(self.timing.duration - self.timing.margin):
                claim = await self._claim()
        except (TimeoutError, LlamaControllerError) as exc:
            log.warning("leader election (%s): could not look at the lease (%s)", self.kind, _say(exc))
            return Claim(None)
        if claim.token is not None:
            self._won(claim.token, sent_at)
        return claim

    def _won(self, token: int, sent_at: float) -> None:
        self.fencing_token = token
        self._trusted(sent_at)
        self._renewal = asyncio.create_task(self._renew_forever(sent_at), name=f"leadership-{self.kind}")
        log.info("leader election (%s): %s leads, term %d", self.kind, self.identity, token)

    def _trusted(self, sent_at: float) -> None:
        self._trusted_until = self.timing.trusted_until(sent_at)
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        wait = self._trusted_until - _now()
        self._expiry = loop.call_later(max(0.0, wait), self._expired)

    def _expired(self) -> None:
        if self._released or self.lost.is_set():
            return
        left = self._trusted_until - _now()
        if left > 0:  # a timer may fire a little early (the loop's clock resolution)
            self._expiry = asyncio.get_running_loop().call_later(left, self._expired)
            return
        self._lose(f"the lease was not renewed for {self.timing.duration - self.timing.margin:g}s")

    async def _renew_forever(self, sent_at: float) -> None:
        renewed: float | None = sent_at
        while renewed is not None:
            await asyncio.sleep(max(0.0, self.timing.next_renewal(renewed) - _now()))
            renewed = await self._renew_once()

    async def _renew_once(self) -> float | None:
        """Renew, trying again until it works (when it was sent) or the term is over (None)."""
        while not self.lost.is_set():
            sent_at = _now()
            left = self._trusted_until - sent_at
            if left <= 0:
                self._expired()
                return None
            try:
                async with asyncio.timeout(left):
                    ours = await self._extend()
            except (TimeoutError, LlamaControllerError) as exc:
                log.warning("leader election (%s): renewal failed (%s); trying again", self.kind, _say(exc))
                await asyncio.sleep(self.timing.retry_in(_now(), self._trusted_until))
                continue
            if not ours:
                self._lose("another controller holds the lease")
                return None
            self._trusted(sent_at)
            return sent_at
        return None

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.reason = reason
        self.lost.set()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._renewal is not None and self._renewal is not asyncio.current_task():
            self._renewal.cancel()  # a renewal in flight must not be taken for proof any more
        log.error("leader election (%s): %s lost term %s: %s", self.kind, self.identity, self.fencing_token, reason)

    async def release(self) -> None:
        """Stop renewing and hand the lease over at once (a clean shutdown), if it is still this holder's."""
        still_ours = self.leading
        self._released = True  # stops acting before the lease is given up
        await self._stop_keeping()
        if still_ours:
            try:
                async with asyncio.timeout(self.timing.renew_interval):
                    await self._give_up()
                log.info("leader election (%s): %s handed the lease over", self.kind, self.identity)
            except (TimeoutError, LlamaControllerError) as exc:
                log.warning(
                    "leader election (%s): could not hand the lease over (%s): the next leader waits for it to end",
                    self.kind,
                    _say(exc),
                )
        await self._close_client()

    async def close(self) -> None:
        """Stop renewing without handing over (what a crash leaves: the lease runs out by itself)."""
        self._released = True
        await self._stop_keeping()
        await self._close_client()

    async def _stop_keeping(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await cancel_and_wait(self._renewal)


def _now() -> float:
    return asyncio.get_running_loop().time()


def _say(exc: BaseException) -> str:
    if isinstance(exc, LlamaControllerError):
        return exc.message
    return "no answer in time" if isinstance(exc, TimeoutError) else exc.__class__.__name__
