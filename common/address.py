"""A listen or dial address, ``host:port``, parsed in one place (pure).

The config spells addresses as text (``server.listen``, ``edge.listen``, ``edge.admin`` …); this is what they
mean: a host — an IPv4 address, a name, or an IPv6 address, written in brackets (``[::1]:11434``) and held
without them — and a port from 1 to 65535. The port is everything after the last colon, so an IPv6 address
without brackets still parses (``::1:11434`` is ``::1``, port 11434), as it always has.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # only this machine connects (the edge's local certificate names)
WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - every interface: hosts compared, never bound here
LOCAL_DIAL_HOST = "127.0.0.1"  # where a client on this machine reaches a listener on a wildcard address
MAX_PORT = 65535


class AddressError(ValueError):
    """Text that is not ``host:port`` with a port from 1 to 65535."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # an IPv6 address without its brackets; "" only for a bare ":port"
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port <= MAX_PORT:
            raise AddressError(f"port {self.port} is not between 1 and {MAX_PORT}")

    @classmethod
    def parse(cls, text: str) -> Address:
        """``host:port``: a host that is not empty and a port of at most five ASCII digits, from 1 to 65535."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= len(str(MAX_PORT))):
            raise AddressError(f'{text!r} is not "host:port"')
        return cls(host.strip("[]"), int(port))  # which checks the port's range

    @property
    def loopback(self) -> bool:
        """Only this machine can reach it (127.0.0.1, ::1 or localhost)."""
        return self.host in LOOPBACK_HOSTS

    @property
    def wildcard(self) -> bool:
        """Every interface of this machine (0.0.0.0, ::)."""
        return self.host in WILDCARD_HOSTS

    @property
    def url_host(self) -> str:
        """The host as a URL or ``host:port`` writes it: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def dialable(self) -> Address:
        """Where a client on this machine connects to a listener on this address: a wildcard on 127.0.0.1."""
        return Address(LOCAL_DIAL_HOST, self.port) if self.wildcard else self

    def __str__(self) -> str:
        return f"{self.url_host}:{self.port}"
