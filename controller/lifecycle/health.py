"""Readiness and liveness: llama-server's ``GET /health`` answers 200 when ready (503 while loading).

llama-server leaves /health open even when it has an API key; the probes send the backend's key anyway,
so a probe never depends on which paths a llama-server version exempts. ``key_accepted`` asks a path the
key guards (``/props``): a backend adopted from an earlier controller is kept only if it opens to the key
derived for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common.errors import UpstreamError
from common.upstream import Upstream, bearer
from controller.runtime.base import Backend


class HttpProbe:
    """Probes share the gateway's keep-alive client: a poll every 20 ms while loading must cost nothing."""

    def __init__(self, upstream: Upstream | None = None) -> None:
        self._upstream = upstream or Upstream()

    async def __call__(self, backend: Backend, timeout: float) -> bool:
        return await self._answers_200(backend, "/health", timeout)

    async def key_accepted(self, backend: Backend, timeout: float) -> bool:
        return await self._answers_200(backend, "/props", timeout)

    async def _answers_200(self, backend: Backend, path: str, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                headers = bearer(backend.api_key)
                async with self._upstream.request("GET", f"{backend.url}{path}", None, headers) as response:
                    await response.read()
                    return response.status == 200
        except (UpstreamError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._upstream.close()


UNHEALTHY_AFTER = 3  # consecutive failed liveness probes


async def watch_liveness(
    backend: Backend,
    probe: Callable[[Backend, float], Awaitable[bool]],
    interval: float,
    unresponsive: Callable[[Backend, int], Awaitable[None]],
    probe_timeout: float = 2.0,
) -> None:
    """Probe /health every ``interval`` while ready; after UNHEALTHY_AFTER misses in a row, report once."""
    misses = 0
    while True:
        await asyncio.sleep(interval)
        if await probe(backend, probe_timeout):
            misses = 0
            continue
        misses += 1
        if misses >= UNHEALTHY_AFTER:
            await unresponsive(backend, misses)
            return
