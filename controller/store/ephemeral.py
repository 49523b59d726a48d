"""In-process ephemeral state for the single-process (SQLite) shape: token buckets, failures, nonces."""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.store.base import counter_key

_MAX_KEYS = 100_000  # bounded by count here and by size in counter_key: keys come from client input


class InProcessEphemeral:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, updated)
        self._failures: dict[str, tuple[int, float]] = {}  # key → (count, expires)
        self._nonces: dict[str, float] = {}  # nonce → expires

    def _prune(self, table: dict[str, object]) -> None:
        if len(table) > _MAX_KEYS:
            for key in list(table)[: len(table) // 2]:
                del table[key]

    async def take(self, key: str, per_minute: int) -> float:
        key = counter_key(key)
        now = self._clock()
        tokens, updated = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - updated) * per_minute / 60.0)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._prune(self._buckets)  # type: ignore[arg-type]
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) * 60.0 / per_minute

    async def failures(self, key: str) -> int:
        key = counter_key(key)
        count, expires = self._failures.get(key, (0, 0.0))
        return count if self._clock() < expires else 0

    async def add_failure(self, key: str, window: float) -> int:
        key = counter_key(key)
        now = self._clock()
        count, expires = self._failures.get(key, (0, 0.0))
        if now >= expires:
            count, expires = 0, now + window
        self._failures[key] = (count + 1, expires)
        self._prune(self._failures)  # type: ignore[arg-type]
        return count + 1

    async def clear_failures(self, key: str) -> None:
        key = counter_key(key)
        self._failures.pop(key, None)

    async def claim_nonce(self, nonce: str, ttl: float) -> bool:
        nonce = counter_key(nonce)
        now = self._clock()
        if len(self._nonces) > _MAX_KEYS // 10:
            self._nonces = {n: e for n, e in self._nonces.items() if e > now}
        if self._nonces.get(nonce, 0.0) > now:
            return False
        self._nonces[nonce] = now + ttl
        return True

    async def close(self) -> None:
        return None
