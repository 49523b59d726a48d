"""Leader election against the real stores, one contract for both kinds: a Redis lock (real redis-server) and a
Kubernetes Lease (the real lightkube client against the emulated API of tests/support/kubecluster.py).

Timings are short here (a 2 s lease renewed every 0.5 s); the limits below are deadlines the design promises, in
lease units, never speed measurements. The measured takeover times are printed (``-s``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from common.background import cancel_and_wait
from controller.leadership.term import LeaseTiming, Term
from tests.leadership.conftest import Arena, KubernetesArena

TIMING = LeaseTiming(2.0, 0.5)
SLACK = 1.0  # the event loop's and the store's own delays, on a busy machine


@pytest.fixture
async def contenders(arena: Arena) -> AsyncIterator[Callable[[str], Term]]:
    made: list[Term] = []

    def contender(identity: str, timing: LeaseTiming = TIMING) -> Term:
        made.append(arena.contender(identity, timing))
        return made[-1]

    yield contender
    for term in made:
        await term.close()


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_election_one_leads_the_other_waits(arena: Arena, contenders: Callable[[str], Term]) -> None:
    one, two = contenders("one"), contenders("two")
    assert await one.try_acquire() and one.leading
    token = one.fencing_token
    waiting = asyncio.create_task(two.acquire())
    await asyncio.sleep(TIMING.duration * 2)  # the lease's length twice over: one renewed it all along
    assert not waiting.done() and not two.leading
    assert one.leading and one.fencing_token == token and not one.lost.is_set()
    assert not await two.try_acquire()
    await cancel_and_wait(waiting)
    if isinstance(arena, KubernetesArena):
        spec = arena.lease()["spec"]
        assert spec["holderIdentity"] == "one" and spec["leaseDurationSeconds"] == 2
        assert spec["acquireTime"] and spec["renewTime"] > spec["acquireTime"]
        assert spec["leaseTransitions"] == token


async def test_election_a_dead_leader_is_replaced_after_its_lease(
    arena: Arena, contenders: Callable[[str], Term]
) -> None:
    one, two = contenders("one"), contenders("two")
    assert await one.try_acquire()
    assert not await two.try_acquire()
    died = now()
    await cancel_and_wait(one.renewal)  # it renews no more and releases nothing: what a SIGKILL leaves
    async with asyncio.timeout(TIMING.worst_takeover + SLACK):
        token = await two.acquire()
    took = now() - died
    print(f"\n{arena.kind}: took over {took:.2f}s after the leader died (lease {TIMING.duration:g}s)")
    assert one.lost.is_set() and not one.leading, "the dead leader's lease was taken while it still trusted it"
    assert one.fencing_token is not None and token > one.fencing_token
    assert two.leading


async def test_election_a_release_hands_over_at_once(arena: Arena, contenders: Callable[[str], Term]) -> None:
    long = LeaseTiming(30.0, 0.5)  # a lease far longer than the wait allowed: the standby did not wait it out
    one, two = contenders("one", long), contenders("two", long)
    assert await one.try_acquire()
    waiting = asyncio.create_task(two.acquire())
    await asyncio.sleep(long.renew_interval)
    released = now()
    await one.release()
    assert not one.leading and not one.lost.is_set()
    async with asyncio.timeout(long.renew_interval + SLACK):
        token = await waiting
    print(f"\n{arena.kind}: handed over {now() - released:.2f}s after the release")
    assert one.fencing_token is not None and token > one.fencing_token


async def test_election_a_stolen_lease_is_noticed(arena: Arena, contenders: Callable[[str], Term]) -> None:
    one = contenders("one")
    assert await one.try_acquire()
    arena.steal()
    async with asyncio.timeout(TIMING.renew_interval + SLACK):
        await one.lost.wait()
    assert not one.leading and one.reason == "another controller holds the lease"
    await one.release()  # nothing to hand over: the lease is the thief's
    assert not await contenders("two").try_acquire()


async def test_election_a_deleted_lease_is_noticed(arena: Arena, contenders: Callable[[str], Term]) -> None:
    one = contenders("one")
    assert await one.try_acquire()
    arena.delete()
    async with asyncio.timeout(TIMING.renew_interval + SLACK):
        await one.lost.wait()
    assert not one.leading
    two = contenders("two")
    assert await two.try_acquire()
    assert two.fencing_token is not None and one.fencing_token is not None
    if arena.kind == "redis":  # the term counter outlives the lock; a new Lease starts its transitions again
        assert two.fencing_token > one.fencing_token


async def test_election_a_leader_cut_off_from_the_store_stops_in_time(
    arena: Arena, contenders: Callable[[str], Term]
) -> None:
    one, two = contenders("one"), contenders("two")
    assert await one.try_acquire()
    with arena.outage():
        async with asyncio.timeout(TIMING.duration + SLACK):
            await one.lost.wait()
        lost = now()
    assert not one.leading and "not renewed" in (one.reason or "")
    # The store back: the lease it could not renew is still there until it ends, and only then taken.
    async with asyncio.timeout(TIMING.worst_takeover + SLACK):
        token = await two.acquire()
    print(f"\n{arena.kind}: the cut-off leader stopped; taken over {now() - lost:.2f}s later")
    assert one.fencing_token is not None and token > one.fencing_token
