"""Caddy's admin API, as the controller uses it (httpx; never on the request hot path).

The admin API has no authentication. The embedded Caddy serves it on a unix socket (``unix//path``) that only
the controller's user can open; compose and Kubernetes keep it on a private network. Failures become
``EdgeError`` with a message an operator can act on.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from common.errors import EdgeError

__all__ = ["CaddyAdmin", "EdgeError", "unix_socket_path"]

UNIX_PREFIX = "unix/"


def unix_socket_path(address: str) -> str | None:
    """The socket file of a Caddy unix address (``unix//run/admin.sock|0600``), or None for host:port."""
    if not address.startswith(UNIX_PREFIX):
        return None
    return address[len(UNIX_PREFIX) :].partition("|")[0]


class CaddyAdmin:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        socket = unix_socket_path(address)
        self.address = socket or address
        if socket is not None:
            # Caddy does not check Host or Origin on a unix socket (a browser cannot reach one): any name does.
            transport = httpx.AsyncHTTPTransport(uds=socket)
            self._client = httpx.AsyncClient(base_url="http://caddy-admin", timeout=timeout, transport=transport)
        else:
            self._client = httpx.AsyncClient(base_url=f"http://{address}", timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EdgeError(f"Caddy's admin API at {self.address} is unreachable: {exc.__class__.__name__}") from exc

    async def load(self, config: dict[str, Any]) -> None:
        """Replace Caddy's whole configuration (atomic; an unchanged document does not reload)."""
        body = json.dumps(config, separators=(",", ":")).encode()
        response = await self._call("POST", "/load", content=body, headers={"Content-Type": "application/json"})
        if response.status_code != 200:
            try:
                detail = str(response.json().get("error", response.text))
            except ValueError:
                detail = response.text
            raise EdgeError(f"Caddy rejected the configuration: {detail.strip()[:500]}")

    async def config(self) -> Any:
        """The configuration Caddy runs now (parsed JSON; null before any was loaded)."""
        response = await self._call("GET", "/config/")
        if response.status_code != 200:
            raise EdgeError(f"Caddy's admin API answered {response.status_code} for its configuration")
        try:
            return response.json()
        except ValueError as exc:
            raise EdgeError("Caddy's admin API answered its configuration with invalid JSON") from exc

    async def alive(self) -> bool:
        try:
            return (await self._call("GET", "/config/")).status_code == 200
        except EdgeError:
            return False

    async def ca_certificate(self) -> str:
        """The root certificate (PEM) of Caddy's local CA, which clients trust for ``tls internal``."""
        response = await self._call("GET", "/pki/ca/local")
        if response.status_code != 200:
            raise EdgeError(f"Caddy has no local CA yet ({response.status_code}): start the edge once")
        pem = response.json().get("root_certificate")
        if not isinstance(pem, str) or "BEGIN CERTIFICATE" not in pem:
            raise EdgeError("Caddy's local CA answered without a root certificate")
        return pem
