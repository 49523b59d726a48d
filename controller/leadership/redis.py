"""Leader election in the store's Redis (compose): a lock key with an expiry and a term counter beside it.

- The lock is ``SET key holder NX PX duration``; the holder renews it only while it still holds it (compare and
  extend, one script) and releases it only while it still holds it (compare and delete): a holder whose lock
  expired and was taken never extends or deletes its successor's.
- The fencing token is ``INCR`` of the term key, in the same script as the lock, so each acquisition has its own
  larger number and no two holders ever share one.
- A standby reads how long the lock has left (PTTL) and looks again just as it ends.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import Unavailable
from controller.leadership.term import Claim, LeaseTiming, Term
from controller.store.redis import PREFIX

# KEYS: lock, term; ARGV: holder, milliseconds. {1, token} when this holder holds the lock now (taken, or
# already its own: a try whose answer was lost), else {0, milliseconds it has left}.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if holder then
  return {0, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
"""

# KEYS: lock; ARGV: holder, milliseconds. 1 when extended, 0 when the lock is not this holder's.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock; ARGV: holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lock_key(name: str) -> str:
    return f"{PREFIX}leader:{name}"


def term_key(name: str) -> str:
    return f"{PREFIX}leader:{name}:term"


class RedisLeadership(Term):
    kind = "redis"

    def __init__(self, url: str, name: str, timing: LeaseTiming, identity: str) -> None:
        super().__init__(timing, identity)
        self.name = name
        self._client = aioredis.Redis.from_url(url, decode_responses=True)
        self._lock, self._term = lock_key(name), term_key(name)
        self._millis = str(max(1, round(timing.duration * 1000)))

    async def _claim(self) -> Claim:
        won, value = await self._call(self._client.eval(_CLAIM, 2, self._lock, self._term, self.identity, self._millis))
        if int(won):
            return Claim(int(value))
        return Claim(None, _ends_in(int(value)))

    async def _extend(self) -> bool:
        return bool(int(await self._call(self._client.eval(_EXTEND, 1, self._lock, self.identity, self._millis))))

    async def _give_up(self) -> None:
        await self._call(self._client.eval(_RELEASE, 1, self._lock, self.identity))

    async def _close_client(self) -> None:
        await self._client.aclose()

    @staticmethod
    async def _call(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis does not answer ({exc.__class__.__name__})") from exc


def _ends_in(pttl: int) -> float | None:
    """PTTL's answer in seconds: -2 the key has just gone (look again now), -1 it has no expiry (set by hand)."""
    if pttl == -2:
        return 0.0
    return pttl / 1000 if pttl >= 0 else None
