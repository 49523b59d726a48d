"""Caddy's admin API, as the controller uses it (httpx; never on the request hot path).

The admin API has no authentication: it stays on loopback (the embedded Caddy) or a private network
(compose, Kubernetes). Failures become ``EdgeError`` with a message an operator can act on.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from controller.errors import EdgeError

__all__ = ["CaddyAdmin", "EdgeError"]


class CaddyAdmin:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
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
