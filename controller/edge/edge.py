"""The edge as the app sees it: settings from the config, the sync loop, and (embedded) the Caddy child."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.config import Config
from controller.edge.admin import CaddyAdmin
from controller.edge.child import CaddyChild, find_caddy
from controller.edge.render import EdgeSettings
from controller.edge.sync import EdgeStatus, EdgeSync

log = logging.getLogger(__name__)

CHILD_START_WAIT = 10.0
WILDCARDS = ("0.0.0.0", "::", "[::]", "")  # noqa: S104 - listen addresses, compared, never bound here


def caddy_home(config: Config) -> Path:
    """The embedded Caddy's folder: bootstrap file, log, and its data (certificates, the local CA)."""
    return config.data_dir / "caddy"


def edge_settings(config: Config) -> EdgeSettings:
    edge = config.edge
    host, _, port = config.server.listen.rpartition(":")
    app = edge.app or f"{'127.0.0.1' if host in WILDCARDS else host}:{port}"
    tls = edge.tls
    return EdgeSettings(
        listen=edge.listen,
        admin_listen=edge.admin_listen or edge.admin,
        app=app,
        tls_mode=tls.mode,
        hostname=edge.hostname,
        cert_file=str(tls.cert_file) if tls.cert_file else None,
        key_file=str(tls.key_file) if tls.key_file else None,
        email=tls.email,
        http_redirect=edge.http_redirect,
        max_body=edge.max_body,
        storage=str(caddy_home(config) / "data") if edge.supervise else None,
    )


def https_url(config: Config) -> str:
    host, _, port = config.edge.listen.rpartition(":")
    shown = config.edge.hostname or ("127.0.0.1" if host in WILDCARDS else host)
    return f"https://{shown}:{port}" if port != "443" else f"https://{shown}"


class Edge:
    def __init__(self, config: Config, publish: Callable[[dict[str, Any]], None]) -> None:
        settings = edge_settings(config)
        self.url = https_url(config)
        self.sync = EdgeSync(settings, CaddyAdmin(config.edge.admin), publish, config.edge.reconcile_interval)
        self.child: CaddyChild | None = None
        if config.edge.supervise:
            binary = find_caddy(config.edge.binary)
            self.child = CaddyChild(
                binary, caddy_home(config), settings.admin_listen, self.sync.changed, self.sync.down
            )

    @property
    def status(self) -> EdgeStatus:
        return self.sync.status

    async def start(self) -> None:
        if self.child is not None:
            await self.child.start()
            # Caddy takes a moment to open its admin API: the first push waits for it (not an outage).
            deadline = time.monotonic() + CHILD_START_WAIT
            while not await self.sync.admin.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # nothing to wait on but the port: poll
        self.sync.start()

    async def close(self) -> None:
        await self.sync.close()
        if self.child is not None:
            await self.child.stop()

    async def ca_certificate(self) -> str:
        return await self.sync.admin.ca_certificate()

    def public(self) -> dict[str, Any]:
        status = self.status.public()
        status["url"] = self.url
        status["admin"] = self.sync.admin.address
        status["supervised"] = self.child is not None
        if self.child is not None:
            status["pid"] = self.child.pid
            status["restarts"] = self.child.restarts
            status["log"] = str(self.child.log_path)
        return status
