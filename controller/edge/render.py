"""The whole Caddy configuration, rendered from the settings alone (pure; golden-tested).

The controller pushes this document with ``POST /load`` at start, after a supervised Caddy restarts, and
whenever a slow timer finds that Caddy runs something else. Every document carries the same ``admin`` block, so
the admin API never moves (embedded: a unix socket only the controller's user can open).

The document does not depend on which models are loaded, on purpose: every config change makes Caddy reload,
and a reload closes the idle keep-alive connections of every client. A client that sends its next request on
such a connection at that moment gets "server disconnected" (measured: 21 of 9,800 requests from one
keep-alive client failed while another model was loaded and unloaded 40 times, when each load and unload
added or removed a per-model route; none with this static document). So ``/llama/<model>/*`` goes to the
gateway's native passthrough like everything else, which authorizes the model, loads it on demand and holds
it loaded while a request runs — and measured no slower than a direct route behind forward_auth.

Routes of the HTTPS server, in order:
1. every request: client copies of the identity header deleted; ``Server`` and ``Via`` removed from answers;
   security headers (HSTS when a real hostname is served).
2. ``/auth/verify`` and ``/internal/*``: 404 — never routed from outside.
3. a declared body over ``max_body``: 413 in the dialect of the path (the body itself is also capped).
4. everything else — ``/``, ``/api/*``, ``/v1/*``, ``/llama/*`` (streaming) and ``/ui``, ``/control``,
   ``/metrics`` … — to the app, which authenticates every request itself. Measured
   (tests/bench/bench_edge.py), a forward_auth round trip in front of the gateway cost 0.6 to 0.9 ms at p50, as
   much as TLS and the gateway together, and bought nothing the gateway's own check does not do. Caddy sets
   ``X-Forwarded-For`` to the address it was reached from, replacing any a client sent (no ``trusted_proxies``
   here, on purpose): the app believes that header from the edge alone (``server.trusted_proxies``).

Errors of the edge itself answer in the caller's dialect too: a body cut by ``request_body`` (413), an app that
cannot be reached while it restarts (503, never Caddy's empty 502), a request body Caddy cannot read (400), and
an answer from the app that broke off (502).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Literal

from common.address import LOCAL_DIAL_HOST, LOOPBACK_HOSTS, Address
from common.dialects import error_body
from common.wire import IDENTITY_HEADER, VERIFY_PATH

HSTS = "max-age=31536000"


@dataclass(frozen=True)
class EdgeSettings:
    listen: str  # host:port of the HTTPS server
    admin_listen: str  # where Caddy's admin API listens (the same in every pushed document)
    app: str  # host:port where Caddy reaches the app (gateway, control API, UI)
    tls_mode: Literal["internal", "files", "acme"] = "internal"
    hostname: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    email: str | None = None
    http_redirect: str | None = None  # host:port of a plain-HTTP listener that redirects to HTTPS
    max_body: int = 64 * 2**20
    storage: str | None = None  # Caddy's data (certificates, the local CA); None: Caddy's default
    log_file: str | None = None  # Caddy's log, rolled by Caddy; None: stderr (a container's log)
    metrics_listen: str | None = None  # a plain-HTTP address that serves only Caddy's /metrics


LOG_ROLL_MB = 10  # Caddy's log moves aside past this size ...
LOG_ROLL_KEEP = 3  # ... and this many old ones are kept


def logging_config(log_file: str | None) -> dict[str, Any]:
    """Caddy's logging: its own admin-request lines left out; into a rolled file when there is one."""
    default: dict[str, Any] = {"exclude": ["admin.api"]}
    if log_file:
        default["writer"] = {
            "output": "file",
            "filename": log_file,
            "roll_size_mb": LOG_ROLL_MB,
            "roll_keep": LOG_ROLL_KEEP,
        }
    return {"logs": {"default": default}}


def _port(address: str) -> int:
    return Address.parse(address).port


def _json_response(status: int, body: dict[str, Any], extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    headers = {"Content-Type": ["application/json"], **(extra or {})}
    return {"handler": "static_response", "status_code": status, "headers": headers, "body": json.dumps(body)}


REPLICAS_REFRESH = "2s"  # how often the edge looks up the gateway replicas' addresses again


def _replicated(address: Address) -> bool:
    """A service name (compose's ``gateway``, a Kubernetes Service): it may stand for several replicas."""
    if address.host == "localhost":
        return False
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return True
    return False


def streaming_proxy(dial: str) -> dict[str, Any]:
    """A reverse proxy for LLM traffic: answers flushed as they come, no time limit on a long generation.

    To a service name, every address it resolves to is an upstream (looked up again every few seconds), the
    least busy taken first; a replica that cannot be reached is left out for a while, and a request whose
    connection failed — before anything was sent — is tried on another (Caddy retries dial errors only)."""
    proxy: dict[str, Any] = {
        "handler": "reverse_proxy",
        "flush_interval": -1,
        "transport": {"protocol": "http", "dial_timeout": "5s", "keep_alive": {"idle_timeout": "30s"}},
        "headers": {"response": {"delete": ["Via"]}},
    }
    address = Address.parse(dial)
    if not _replicated(address):
        return {**proxy, "upstreams": [{"dial": dial}]}
    return {
        **proxy,
        "dynamic_upstreams": {
            "source": "a",
            "name": address.host,
            "port": str(address.port),
            "refresh": REPLICAS_REFRESH,
        },
        "load_balancing": {
            "selection_policy": {"policy": "least_conn"},
            "retries": 2,
            "try_duration": "5s",
            "try_interval": "100ms",
        },
        "health_checks": {"passive": {"fail_duration": "10s", "max_fails": 1}},
    }


def _common_route(settings: EdgeSettings) -> dict[str, Any]:
    response: dict[str, Any] = {
        "set": {"X-Content-Type-Options": ["nosniff"], "Referrer-Policy": ["no-referrer"]},
        "delete": ["Server", "Via"],
        "deferred": True,
    }
    if settings.hostname and settings.tls_mode in ("acme", "files"):
        response["set"]["Strict-Transport-Security"] = [HSTS]
    return {"handle": [{"handler": "headers", "request": {"delete": [IDENTITY_HEADER]}, "response": response}]}


# Each group of paths answers in its own dialect; the body comes from the one place that decides it.
_DIALECT_GROUPS = [
    (["/", "/api/*"], "/api/"),
    (["/v1/messages", "/v1/messages/*"], "/v1/messages"),
    (["/v1/*", "/llama/*"], "/v1/"),
    (["*"], "/control/"),
]


def _in_dialect(condition: str, status: int, message: str, code: str) -> list[dict[str, Any]]:
    """``status`` with ``message`` in the dialect of the path, when ``condition`` (a Caddy expression) holds."""
    return [
        {
            "match": [{"path": paths, "expression": condition}],
            "handle": [_json_response(status, error_body(example, status, message, code))],
            "terminal": True,
        }
        for paths, example in _DIALECT_GROUPS
    ]


def _too_large(settings: EdgeSettings, condition: str) -> list[dict[str, Any]]:
    message = f"request body is larger than the limit of {settings.max_body} bytes"
    return _in_dialect(condition, 413, message, "payload_too_large")


# Caddy's reverse proxy answers 502 for every failure; its message tells them apart. Go's net/http words: a dial
# error starts with "dial " (refused, no such host; a dial timeout is a 504), a malformed or cut request body
# is its chunked reader's error, bare ("invalid byte in chunk length", "unexpected EOF"); an answer from the
# app that broke off is "EOF", "read tcp …" or "net/http: HTTP/1.x transport connection broken: …".
_STATUS = "{http.error.status_code}"
_MESSAGE = "{http.error.message}"
_DIAL_FAILED = f"{_STATUS} in [502, 504] && {_MESSAGE}.startsWith('dial ')"
_BODY_UNREADABLE = f"{_STATUS} == 502 && {_MESSAGE}.matches('chunk|^unexpected EOF$|^header line too long$')"


def _error_routes(settings: EdgeSettings) -> list[dict[str, Any]]:
    """The edge's own errors, in the caller's dialect, never Caddy's empty answer: a body cut by request_body
    (413); the app unreachable, because Caddy cannot connect to it (the controller is restarting or stopped:
    503); a request whose body Caddy cannot read (bad chunked framing, cut short: 400, the client's fault);
    and an answer from the app that broke off (502)."""
    unreachable = "LlamaController is not reachable behind the edge (starting or restarting); try again shortly"
    unreadable = "the request body could not be read: its chunked encoding is malformed or it was cut short"
    broken = "LlamaController's answer broke off before it was complete"
    return [
        *_too_large(settings, f"{_STATUS} == 413"),
        *_in_dialect(_DIAL_FAILED, 503, unreachable, "service_unavailable"),
        *_in_dialect(_BODY_UNREADABLE, 400, unreadable, "bad_request"),
        *_in_dialect(f"{_STATUS} == 502", 502, broken, "upstream_error"),
    ]


def _too_large_routes(settings: EdgeSettings) -> list[dict[str, Any]]:
    """A declared length over the limit is refused before anything else happens."""
    length = "{http.request.header.Content-Length}"
    return _too_large(settings, f"{length} != '' && int({length}) > {settings.max_body}")


def _tls(settings: EdgeSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tls app and the server's connection policies for the TLS mode."""
    if settings.tls_mode == "files":
        tags = ["llamacontroller"]
        files = [{"certificate": settings.cert_file, "key": settings.key_file, "tags": tags}]
        return {"certificates": {"load_files": files}}, [{"certificate_selection": {"any_tag": tags}}]
    if settings.tls_mode == "acme":
        names = [settings.hostname or ""]
        issuer: dict[str, Any] = {"module": "acme", "email": settings.email}
        by_address = names[0]
    else:
        listen = Address.parse(settings.listen)
        local = listen.wildcard or listen.loopback
        names = [*([settings.hostname] if settings.hostname else []), *(LOOPBACK_HOSTS if local else [listen.host])]
        issuer = {"module": "internal"}
        by_address = LOCAL_DIAL_HOST if local else listen.host
    tls = {"certificates": {"automate": names}, "automation": {"policies": [{"subjects": names, "issuers": [issuer]}]}}
    # A client that sends no server name (it connects to an IP address) gets this certificate. Without it Caddy
    # looks for one for the address it was reached on, which in a container is the container's own address.
    return tls, [{"default_sni": by_address}]


def render(settings: EdgeSettings) -> dict[str, Any]:
    """The complete Caddy JSON config (see the module docstring for the routes)."""
    app = settings.app
    routes: list[dict[str, Any]] = [
        _common_route(settings),
        {
            "match": [{"path": [VERIFY_PATH, f"{VERIFY_PATH}/*", "/internal", "/internal/*"]}],
            "handle": [_json_response(404, {"error": "not found"})],
            "terminal": True,
        },
        *_too_large_routes(settings),
        {"handle": [{"handler": "request_body", "max_size": settings.max_body}, streaming_proxy(app)]},
    ]
    tls, policies = _tls(settings)
    server: dict[str, Any] = {
        "listen": [settings.listen],
        "protocols": ["h1", "h2"],  # no HTTP/3: one TCP port to publish
        "routes": routes,
        "tls_connection_policies": policies,
        "automatic_https": {"disable_redirects": True},
        "errors": {"routes": _error_routes(settings)},
    }
    servers: dict[str, Any] = {"edge": server}
    http: dict[str, Any] = {"https_port": _port(settings.listen), "servers": servers}
    if settings.http_redirect:
        http["http_port"] = _port(settings.http_redirect)
        location = f"https://{{http.request.host}}:{_port(settings.listen)}{{http.request.uri}}"
        redirect = {"handler": "static_response", "status_code": 308, "headers": {"Location": [location]}}
        servers["redirect"] = {"listen": [settings.http_redirect], "routes": [{"handle": [redirect]}]}
    if settings.metrics_listen:
        # Caddy's metrics for Prometheus, without the admin API that also serves them (it can change anything).
        metrics = {"match": [{"path": ["/metrics"]}], "handle": [{"handler": "metrics"}], "terminal": True}
        not_found = {"handle": [_json_response(404, {"error": "not found"})]}
        servers["metrics"] = {
            "listen": [settings.metrics_listen],
            "routes": [metrics, not_found],
            "automatic_https": {"disable": True},
        }
    config: dict[str, Any] = {
        "admin": {"listen": settings.admin_listen, "config": {"persist": False}},
        "logging": logging_config(settings.log_file),
        "apps": {
            "http": http,
            "tls": tls,
            "pki": {"certificate_authorities": {"local": {"name": "LlamaController Local CA", "install_trust": False}}},
        },
    }
    if settings.storage:
        config["storage"] = {"module": "file_system", "root": settings.storage}
    return config
