"""Who is on the other end of a request: the client's address, through the edge.

Behind the HTTPS edge every connection comes from Caddy, so the TCP peer says nothing about the client. Caddy's
reverse proxy sets ``X-Forwarded-For`` to the address it was reached from, replacing any copy a client sent
(no ``trusted_proxies`` in the rendered config). That header is believed only when the TCP peer is one of
``server.trusted_proxies`` (the edge); from anyone else it is ignored, so a client that reaches the app directly
cannot choose its own address.

The address is worked out lazily, where one is used (the sign-in throttle, the audit log, the access log), not
per request in front of everything as uvicorn's ``proxy_headers`` would: on the gateway's path it costs a
backwards scan of the headers and a pattern match, for the access-log line, after the answer has left.
Host names among the trusted proxies (compose's ``edge``, a headless Service in Kubernetes) are resolved in the
background and again every ``RESOLVE_INTERVAL``, since an edge that restarts may come back on a new address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

PEERS_KEY = "llamacontroller.peers"  # where the outermost layer leaves the TrustedProxies in the ASGI scope
RESOLVE_INTERVAL = 15.0
_VERDICTS = 4096  # peers remembered as trusted or not (bounded: many addresses may connect)
# What an IP address is spelled with (no port, no zone): checked instead of parsed, which costs 10 times more.
_SPELLING = re.compile(r"[0-9A-Fa-f:.]{2,45}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> str | None:
    """``text`` as an IP address in its canonical spelling (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class TrustedProxies:
    """The peers whose ``X-Forwarded-For`` is believed: addresses, networks (CIDR) and host names."""

    def __init__(self, entries: Iterable[str]) -> None:
        addresses: set[str] = set()
        self._networks: list[Network] = []
        names: list[str] = []
        for entry in entries:
            if "/" in entry:
                self._networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            elif (address := _address(entry)) is not None:
                addresses.add(address)
            else:
                names.append(entry.strip())
        self.names = tuple(names)
        self._static = frozenset(addresses)
        self._resolved: frozenset[str] = frozenset()
        self._verdicts: dict[str, bool] = {}

    def trusts(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._trusts(host)
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict

    def _trusts(self, host: str) -> bool:
        if host in self._static or host in self._resolved:
            return True
        address = _address(host)  # another spelling of the same address (IPv4-mapped IPv6)?
        if address is None:
            return False
        if address != host and (address in self._static or address in self._resolved):
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._networks)

    def client(self, scope: Any) -> str:
        """The client's address: the last ``X-Forwarded-For`` entry when a trusted proxy sent the request
        (the one the edge wrote), else the TCP peer."""
        peer = scope.get("client")
        host = str(peer[0]) if peer else ""
        if not host or not self.trusts(host):
            return host
        forwarded: bytes | None = None
        for name, value in reversed(scope.get("headers", ())):  # the last copy; Caddy adds its own at the end
            if name == b"x-forwarded-for":
                forwarded = value
                break
        if not forwarded:
            return host
        last = forwarded.rpartition(b",")[2].strip().decode("latin-1")
        return last if _SPELLING.fullmatch(last) else host

    async def resolve(self) -> None:
        """Look the host names up again (keeping the last answer of a name that does not resolve now)."""
        if not self.names:
            return
        loop = asyncio.get_running_loop()
        found: set[str] = set()
        for name in self.names:
            try:
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("trusted proxy %r does not resolve (%s): its X-Forwarded-For is not believed", name, exc)
                continue
            found.update(a for info in infos if (a := _address(str(info[4][0]))) is not None)
        if (found or not self._resolved) and found != self._resolved:
            self._resolved = frozenset(found)
            self._verdicts = {}

    async def keep_resolved(self) -> None:
        """Resolve now and every RESOLVE_INTERVAL until cancelled (nothing to do without host names)."""
        while self.names:
            try:
                await self.resolve()
            except Exception:  # never the end of the refresher: the next round may succeed
                log.exception("resolving the trusted proxies failed")
            await asyncio.sleep(RESOLVE_INTERVAL)


def client_address(scope: Any) -> str:
    """The client's address for this request (see the module docstring); the TCP peer where no
    TrustedProxies were attached (a bare app in a test)."""
    peers: TrustedProxies | None = scope.get(PEERS_KEY)
    if peers is not None:
        return peers.client(scope)
    peer = scope.get("client")
    return str(peer[0]) if peer else ""
