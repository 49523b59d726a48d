"""Leader election's pure parts: the lease arithmetic, the config, the fence, and the keeping of a term against an
in-memory lease store (tests/leadership has the same against a real Redis and the emulated Kubernetes API)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.background import cancel_and_wait
from common.errors import ConfigError, NotLeader, Unavailable
from controller.config import validate_config
from controller.leadership import NoLeadership, holder_identity, make_leadership
from controller.leadership.fence import FencedRuntime
from controller.leadership.term import Claim, LeaseTiming, Term
from controller.runtime.base import LaunchSpec
from controller.runtime.fake import FakeRuntime

DEFAULTS = LeaseTiming(10.0, 2.0)


def test_leadership_a_lease_is_trusted_until_a_margin_before_its_earliest_end() -> None:
    assert DEFAULTS.margin == pytest.approx(2.0)
    assert DEFAULTS.trusted_until(100.0) == pytest.approx(108.0)  # the store's lease ends no sooner than 110
    assert DEFAULTS.next_renewal(100.0) == pytest.approx(102.0)
    # A leader misses renewals and still has several tries before it gives up.
    assert (DEFAULTS.trusted_until(0.0) - DEFAULTS.next_renewal(0.0)) / DEFAULTS.retry_in(0.0, 100.0) >= 4


def test_leadership_a_failed_renewal_is_tried_again_soon_and_never_past_the_trust() -> None:
    assert DEFAULTS.retry_in(now=100.0, trusted_until=108.0) == pytest.approx(0.5)
    assert DEFAULTS.retry_in(now=107.9, trusted_until=108.0) == pytest.approx(0.1)
    assert DEFAULTS.retry_in(now=109.0, trusted_until=108.0) == 0.0


def test_leadership_a_standby_looks_again_as_the_lease_it_saw_ends() -> None:
    assert DEFAULTS.standby_wait(None) == 2.0  # unknown: every renew interval
    assert DEFAULTS.standby_wait(30.0) == 2.0
    assert DEFAULTS.standby_wait(0.7) == pytest.approx(0.75)
    assert DEFAULTS.standby_wait(-1.0) == pytest.approx(0.05)  # ended already: at once


def test_leadership_the_defaults_take_over_within_15_seconds() -> None:
    config = validate_config({})
    election = config.server.leader_election
    assert (election.kind, election.name, election.lease_duration, election.renew_interval) == (
        "none",
        "llamacontroller",
        10.0,
        2.0,
    )
    worst = LeaseTiming(election.lease_duration, election.renew_interval).worst_takeover
    assert worst == 12.0  # leaves 3 s of 15 for the adoption of what the dead leader left


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"server": {"leader_election": {"lease_duration": "4s", "renew_interval": "3s"}}}, "at most half"),
        ({"server": {"leader_election": {"renew_interval": 0}}}, "more than 0"),
        ({"server": {"leader_election": {"kind": "etcd"}}}, "kind"),
        ({"server": {"leader_election": {"name": "Not A Name"}}}, "name"),
        ({"server": {"leader_election": {"kind": "redis"}}}, "set store.kind redis"),
        ({"server": {"leader_election": {"kind": "kubernetes"}}}, "set runtime.kind kubernetes"),
        ({"server": {"leader_election": {"lease": "10s"}}}, "lease"),
    ],
)
def test_leadership_config_is_strict(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert problem in " ".join(caught.value.problems)


def test_leadership_config_parses_durations() -> None:
    config = validate_config(
        {
            "server": {"leader_election": {"kind": "redis", "lease_duration": "1m", "renew_interval": 20}},
            "store": {"kind": "redis"},
        }
    )
    assert config.server.leader_election.lease_duration == 60.0
    assert make_leadership(config).kind == "redis"


def test_leadership_holder_identities_differ() -> None:
    assert holder_identity() != holder_identity()


async def test_leadership_none_leads_at_once() -> None:
    alone = make_leadership(validate_config({}))
    assert isinstance(alone, NoLeadership) and not alone.leading
    assert await alone.try_acquire() and alone.leading and alone.fencing_token == 0
    assert await alone.acquire() == 0
    await alone.release()
    assert not alone.leading and not alone.lost.is_set()


async def test_leadership_the_fence_refuses_every_runtime_change_while_not_leading(tmp_path: Path) -> None:
    leading = False
    inner = FakeRuntime()
    fenced = FencedRuntime(inner, lambda: leading)
    spec = LaunchSpec("a:latest", tmp_path / "a.gguf")
    for call in (fenced.start(spec), fenced.list_managed()):
        with pytest.raises(NotLeader):
            await call
    assert inner.starts == []
    leading = True
    backend = await fenced.start(spec)
    assert await fenced.list_managed() == [backend]
    leading = False
    for refused in (fenced.stop(backend, 1.0), fenced.keep_labels(backend, {"x": "y"})):
        with pytest.raises(NotLeader):
            await refused
    assert inner.stops == [] and inner.kept == []
    assert fenced.name == "fake"


class Store:
    """One lease in memory, with its end in the event loop's time; ``down`` makes every call fail."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.holder: str | None = None
        self.ends = 0.0
        self.term = 0
        self.down = False

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def free(self) -> bool:
        return self.holder is None or self.now() >= self.ends


class InMemory(Term):
    kind = "memory"

    def __init__(self, store: Store, timing: LeaseTiming, identity: str) -> None:
        super().__init__(timing, identity)
        self.store = store
        self.given_up = False

    def _reachable(self) -> None:
        if self.store.down:
            raise Unavailable("the store is down")

    async def _claim(self) -> Claim:
        self._reachable()
        store = self.store
        if not store.free() and store.holder != self.identity:
            return Claim(None, store.ends - store.now())
        if store.holder != self.identity or store.free():
            store.term += 1
        store.holder, store.ends = self.identity, store.now() + store.duration
        return Claim(store.term)

    async def _extend(self) -> bool:
        self._reachable()
        if self.store.holder != self.identity or self.store.free():
            return False
        self.store.ends = self.store.now() + self.store.duration
        return True

    async def _give_up(self) -> None:
        self._reachable()
        if self.store.holder == self.identity:
            self.store.holder = None
            self.given_up = True


TIMING = LeaseTiming(0.6, 0.1)


async def test_leadership_a_term_is_kept_by_renewals() -> None:
    store = Store(TIMING.duration)
    leader, other = InMemory(store, TIMING, "one"), InMemory(store, TIMING, "two")
    assert await leader.try_acquire() and leader.fencing_token == 1
    assert not await other.try_acquire()
    await asyncio.sleep(TIMING.duration * 3)  # several leases long: renewed all along
    assert leader.leading and store.holder == "one" and not await other.try_acquire()
    await leader.release()
    assert leader.given_up and not leader.leading and not leader.lost.is_set()
    assert await other.acquire() == 2
    await other.close()


async def test_leadership_a_leader_that_cannot_renew_stops_before_its_lease_ends() -> None:
    store = Store(TIMING.duration)
    leader = InMemory(store, TIMING, "one")
    assert await leader.try_acquire()
    store.down = True
    await asyncio.wait_for(leader.lost.wait(), TIMING.duration * 10)
    assert store.now() < store.ends, "it stopped trusting its lease only after the lease had ended"
    assert not leader.leading and "not renewed" in (leader.reason or "")
    store.down = False
    assert not await leader.try_acquire(), "a term that was lost is not taken again"
    await leader.close()


async def test_leadership_a_stuck_renewer_still_ends_the_term_in_time() -> None:
    """The timer, not the renewing task, ends the term: a renewal that never returns cannot keep it alive."""
    store = Store(TIMING.duration)
    leader = InMemory(store, TIMING, "one")
    assert await leader.try_acquire()
    await cancel_and_wait(leader.renewal)
    await asyncio.wait_for(leader.lost.wait(), TIMING.duration * 10)
    assert store.now() < store.ends and not leader.leading
    await leader.close()


async def test_leadership_a_taken_lease_is_lost_at_the_next_renewal() -> None:
    store = Store(TIMING.duration)
    leader = InMemory(store, TIMING, "one")
    assert await leader.try_acquire()
    store.holder = "thief"
    await asyncio.wait_for(leader.lost.wait(), TIMING.duration * 10)
    assert leader.reason == "another controller holds the lease" and not leader.leading
    await leader.release()
    assert store.holder == "thief" and not leader.given_up, "a lost lease is never released: it is another's"
