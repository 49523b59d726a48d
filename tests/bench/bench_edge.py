"""The HTTPS edge's cost, side by side in one run: the same one-token completion, interleaved, reached

1. directly (llama-server, plain HTTP),
2. through the gateway (plain HTTP, the token checked by the app),
3. through the edge: TLS + the gateway, which checks the token itself (what the edge does),
4. through the edge to llama-server's own API: TLS + the gateway's native passthrough (`/llama/<model>/...`),
5. through the edge with forward_auth in front of the gateway: TLS + `/auth/verify` + the gateway checking the
   signed identity (the design's first plan, measured here on an extra route the bench adds),
6. through a direct route: TLS + forward_auth + llama-server (the first plan for `/llama/<model>/...`, which
   made Caddy reload on every load and unload; an extra route the bench adds),

each over one kept-alive connection (TLS: HTTP/1.1). Run with ``make bench-edge`` or
``python -m tests.bench.bench_edge [--requests 500]``.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from common.wire import IDENTITY_HEADER, VERIFY_PATH
from controller.edge.render import streaming_proxy
from controller.runtime.process import free_port
from tests.bench.bench_gateway import RawClient, percentile
from tests.support.server import backend_headers, serve_subprocess
from tests.support.tinymodel import write_tiny_model

ALT_PREFIX = "/with-forward-auth"
DIRECT_PREFIX = "/direct-tiny"
IDENTITY = IDENTITY_HEADER


def forward_auth(app: str) -> dict[str, Any]:
    """Caddy's forward_auth, expanded: GET /auth/verify with the original method and URI; on 2xx the signed
    identity is copied into the request and it goes on; otherwise the answer goes back to the client."""
    copy = {
        "match": [{"not": [{"vars": {f"{{http.reverse_proxy.header.{IDENTITY}}}": ["", "<nil>"]}}]}],
        "handle": [
            {"handler": "headers", "request": {"set": {IDENTITY: [f"{{http.reverse_proxy.header.{IDENTITY}}}"]}}}
        ],
    }
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": app}],
        "rewrite": {"method": "GET", "uri": VERIFY_PATH},
        "headers": {
            "request": {
                "set": {"X-Forwarded-Method": ["{http.request.method}"], "X-Forwarded-Uri": ["{http.request.uri}"]}
            }
        },
        "handle_response": [{"match": {"status_code": [2]}, "routes": [{"handle": [{"handler": "vars"}]}, copy]}],
    }


def with_alternative_routes(
    config: dict[str, Any], app: str, backend: str, backend_auth: dict[str, str]
) -> dict[str, Any]:
    """The pushed config plus the two plans measured against it: forward_auth before the gateway, and
    forward_auth before the model's backend (which Caddy then opens with the backend's own key)."""
    direct = streaming_proxy(backend)
    direct["headers"] = {**direct["headers"], "request": {"set": {k: [v] for k, v in backend_auth.items()}}}
    routes = [
        (ALT_PREFIX, streaming_proxy(app)),
        (DIRECT_PREFIX, direct),
    ]
    for prefix, proxy in routes:
        alternative = {
            "match": [{"path": [f"{prefix}/*"]}],
            "handle": [{"handler": "rewrite", "strip_path_prefix": prefix}, forward_auth(app), proxy],
            "terminal": True,
        }
        config["apps"]["http"]["servers"]["edge"]["routes"].insert(2, alternative)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        port, edge_port, admin_port = free_port(), free_port(), free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{port}", "data_dir": str(root / "data")},
            # pushed again only on change: the bench's extra route stays while it measures
            "edge": {
                "listen": f"127.0.0.1:{edge_port}",
                "admin": f"127.0.0.1:{admin_port}",
                "reconcile_interval": 3600,
            },
            "models_dir": str(root / "none"),
            "defaults": {"max_concurrent": 4, "keep_alive": -1, "ctx_size": 2048},
            "models": {"tiny": {"path": str(write_tiny_model(root / "tiny.gguf"))}},
        }
        with serve_subprocess(config, root) as served:
            backend = served.http.post("/control/v1/models/tiny/load", timeout=60).json()["backend_url"]
            backend_port = int(backend.rsplit(":", 1)[1])
            pushed = httpx.get(f"http://127.0.0.1:{admin_port}/config/").json()
            app = f"127.0.0.1:{port}"
            backend_auth = backend_headers(root / "data", "tiny:latest")
            extended = with_alternative_routes(pushed, app, f"127.0.0.1:{backend_port}", backend_auth)
            httpx.post(f"http://127.0.0.1:{admin_port}/load", json=extended).raise_for_status()
            tls = ssl.create_default_context(cafile=served.ca_file())
            auth = {"Authorization": f"Bearer {served.token}"}
            body = json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
            ).encode()
            targets = [
                (
                    "direct llama-server (HTTP)",
                    RawClient("127.0.0.1", backend_port, backend_auth),
                    "/v1/chat/completions",
                ),
                ("gateway (HTTP)", RawClient("127.0.0.1", port, auth), "/v1/chat/completions"),
                (
                    "edge: TLS+gateway",
                    RawClient("127.0.0.1", edge_port, auth, tls),
                    "/v1/chat/completions",
                ),
                (
                    "edge: TLS+gateway native /llama",
                    RawClient("127.0.0.1", edge_port, auth, tls),
                    "/llama/tiny/v1/chat/completions",
                ),
                (
                    "edge: TLS+forward_auth+gateway",
                    RawClient("127.0.0.1", edge_port, auth, tls),
                    f"{ALT_PREFIX}/v1/chat/completions",
                ),
                (
                    "edge: TLS+forward_auth+direct",
                    RawClient("127.0.0.1", edge_port, auth, tls),
                    f"{DIRECT_PREFIX}/v1/chat/completions",
                ),
            ]
            times: dict[str, list[float]] = {label: [] for label, _, _ in targets}
            for index in range(args.requests + 20):
                for label, client, path in targets:
                    elapsed, _ = client.post(path, body)
                    if index >= 20:  # warm-up: connections, TLS sessions, prompt cache
                        times[label].append(elapsed)
            base50 = statistics.median(times[targets[0][0]])
            base99 = percentile(times[targets[0][0]], 0.99)
            print(f"\none-token completion, {args.requests} interleaved requests per target (ms)")
            print(f"{'path':<34}{'p50':>8}{'p99':>8}{'added p50':>11}{'added p99':>11}")
            for label, _, _ in targets:
                p50, p99 = statistics.median(times[label]), percentile(times[label], 0.99)
                added = f"{(p50 - base50) * 1e3:>11.2f}{(p99 - base99) * 1e3:>11.2f}"
                print(f"{label:<34}{p50 * 1e3:>8.2f}{p99 * 1e3:>8.2f}{added}")


if __name__ == "__main__":
    main()
