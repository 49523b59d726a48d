"""Address: "host:port" parsed once; and what the config, the edge and the banner make of one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.address import Address, AddressError
from controller.config import ConfigError, validate_config
from controller.edge.edge import edge_settings, https_url
from controller.edge.render import EdgeSettings, render


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:11434", "127.0.0.1", 11434),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:11434", "::1", 11434),
        ("[::]:443", "::", 443),
        ("[2001:db8::5]:65535", "2001:db8::5", 65535),
        ("::1:8080", "::1", 8080),  # unbracketed: the port is after the last colon, as it always was
        ("controller:11434", "controller", 11434),
        ("llm.example.com:1", "llm.example.com", 1),
        ("localhost:00443", "localhost", 443),
    ],
)
def test_address_parses_host_and_port(text: str, host: str, port: int) -> None:
    address = Address.parse(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["", "nope", "11434", ":11434", "host:", "host:0", "host:65536", "host:123456", "host:-1", "host:+80", "h:²"],
)
def test_address_refuses_anything_else(text: str) -> None:
    with pytest.raises(AddressError, match=r"host:port|between 1 and 65535"):
        Address.parse(text)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_address_port_bounds_hold_when_built_directly(port: int) -> None:
    with pytest.raises(AddressError):
        Address("127.0.0.1", port)
    assert Address("127.0.0.1", 1).port == 1 and Address("127.0.0.1", 65535).port == 65535


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("127.0.0.1:11434", "127.0.0.1:11434"),
        ("[::1]:11434", "[::1]:11434"),
        ("::1:11434", "[::1]:11434"),
        ("controller:80", "controller:80"),
    ],
)
def test_address_str_is_host_port_with_ipv6_in_brackets(text: str, shown: str) -> None:
    assert str(Address.parse(text)) == shown
    assert Address.parse(shown) == Address.parse(text)


@given(st.integers(min_value=1, max_value=65535), st.sampled_from(["127.0.0.1", "::1", "example.com", "::"]))
def test_address_str_parses_back_to_itself(port: int, host: str) -> None:
    address = Address(host, port)
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "loopback", "wildcard"),
    [
        ("127.0.0.1:1", True, False),
        ("localhost:1", True, False),
        ("[::1]:1", True, False),
        ("0.0.0.0:1", False, True),
        ("[::]:1", False, True),
        ("::1", False, False),  # host ":", port 1: neither
        ("10.0.0.1:1", False, False),
        ("controller:1", False, False),
        ("127.0.0.2:1", False, False),  # only the names the config always took as loopback
    ],
)
def test_address_loopback_and_wildcard(text: str, loopback: bool, wildcard: bool) -> None:
    address = Address.parse(text)
    assert (address.loopback, address.wildcard) == (loopback, wildcard)


def test_address_dialable_is_loopback_for_a_wildcard() -> None:
    assert str(Address.parse("0.0.0.0:11434").dialable()) == "127.0.0.1:11434"
    assert str(Address.parse("[::]:11434").dialable()) == "127.0.0.1:11434"
    assert str(Address.parse("[::1]:11434").dialable()) == "[::1]:11434"
    assert str(Address.parse("10.1.2.3:11434").dialable()) == "10.1.2.3:11434"


def _config(tmp_path: Path, **sections: dict[str, object]) -> dict[str, object]:
    server = {"data_dir": str(tmp_path), **sections.pop("server", {})}
    return {"server": server, **sections}


@pytest.mark.parametrize(
    ("listen", "app"),
    [
        ("0.0.0.0:11434", "127.0.0.1:11434"),
        ("[::]:11434", "127.0.0.1:11434"),
        ("[::1]:11434", "[::1]:11434"),
        ("10.0.0.5:9000", "10.0.0.5:9000"),
    ],
)
def test_address_edge_reaches_the_app_on_its_listen_address(tmp_path: Path, listen: str, app: str) -> None:
    config = validate_config(_config(tmp_path, server={"listen": listen}))
    assert edge_settings(config).app == app


@pytest.mark.parametrize(
    ("edge", "url"),
    [
        ({"listen": "127.0.0.1:11443"}, "https://127.0.0.1:11443"),
        ({"listen": "0.0.0.0:443"}, "https://127.0.0.1"),
        ({"listen": "[::]:8443"}, "https://127.0.0.1:8443"),
        ({"listen": "[::1]:8443"}, "https://[::1]:8443"),
        ({"listen": "0.0.0.0:443", "hostname": "llm.example.com"}, "https://llm.example.com"),
    ],
)
def test_address_https_url(tmp_path: Path, edge: dict[str, object], url: str) -> None:
    assert https_url(validate_config(_config(tmp_path, edge=edge))) == url


@pytest.mark.parametrize(("listen", "allowed"), [("127.0.0.1:1", True), ("[::1]:1", True), ("0.0.0.0:1", False)])
def test_address_auth_off_only_on_loopback(tmp_path: Path, listen: str, allowed: bool) -> None:
    raw = _config(tmp_path, server={"listen": listen}, auth={"enabled": False})
    if allowed:
        validate_config(raw)
    else:
        with pytest.raises(ConfigError):
            validate_config(raw)


@pytest.mark.parametrize(
    ("listen", "names", "default_sni"),
    [
        ("127.0.0.1:11443", ["localhost", "127.0.0.1", "::1"], "127.0.0.1"),
        ("[::]:11443", ["localhost", "127.0.0.1", "::1"], "127.0.0.1"),
        ("[fd00::7]:11443", ["fd00::7"], "fd00::7"),
        ("10.0.0.5:11443", ["10.0.0.5"], "10.0.0.5"),
    ],
)
def test_address_internal_certificate_names(listen: str, names: list[str], default_sni: str) -> None:
    config = render(EdgeSettings(listen=listen, admin_listen="127.0.0.1:2019", app="127.0.0.1:1"))
    assert config["apps"]["tls"]["certificates"]["automate"] == names
    assert config["apps"]["http"]["servers"]["edge"]["tls_connection_policies"] == [{"default_sni": default_sni}]
