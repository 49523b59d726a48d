"""Readiness and liveness: llama-server's ``GET /health`` answers 200 when ready (503 while loading)."""

from __future__ import annotations

import asyncio

from controller.errors import UpstreamError
from controller.runtime.base import Backend
from proxy.upstream import Upstream


class HttpProbe:
    """Probes share the gateway's keep-alive client: a poll every 20 ms while loading must cost nothing."""

    def __init__(self, upstream: Upstream | None = None) -> None:
        self._upstream = upstream or Upstream()

    async def __call__(self, backend: Backend, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                async with self._upstream.request("GET", f"{backend.url}/health", None) as response:
                    await response.read()
                    return response.status == 200
        except (UpstreamError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._upstream.close()
