"""One shared aiohttp client pool to the backends; its exceptions become ours at this boundary.

aiohttp rather than httpx on the hot path: on these machines httpx's async client cost about 3 ms more
per request (see docs/architecture.md, "Choosing the hot path").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp

from controller.errors import UpstreamError

# Generation can take minutes: no total or read timeout here (llama-server has its own), only connect.
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=None)


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30),
                timeout=_TIMEOUT,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; connection failures (also mid-stream) raise UpstreamError."""
        try:
            async with self._client().request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                yield response
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError("the model's backend refused the connection (it may have just stopped)") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise UpstreamError("the model's backend closed the connection (it may have crashed)") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"the model's backend failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
