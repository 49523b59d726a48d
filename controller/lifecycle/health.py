"""Readiness and liveness: llama-server's ``GET /health`` answers 200 when ready (503 while loading)."""

from __future__ import annotations

import aiohttp

from controller.runtime.base import Backend


class HttpProbe:
    """One shared keep-alive session for every probe: a poll every 20 ms must cost next to nothing."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, backend: Backend, timeout: float) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False
            )
        try:
            async with self._session.get(
                f"{backend.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
