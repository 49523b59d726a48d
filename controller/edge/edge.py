"""The edge as the app sees it: settings from the config, the sync loop, and (embedded) the Caddy child."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.config import Config
from controller.edge.admin import CaddyAdmin
from controller.edge.child import CaddyChild, CaddyWatch, find_caddy
from controller.edge.render import EdgeSettings
from controller.edge.sync import EdgeStatus, EdgeSync
from controller.events import EdgeChanged

log = logging.getLogger(__name__)


def caddy_home(config: Config) -> Path:
    """The embedded Caddy's folder: bootstrap file, log, and its data (certificates, the local CA)."""
    return config.data_dir / "caddy"


def admin_socket(config: Config) -> Path:
    """The embedded Caddy's admin API: a unix socket only the controller's user can open (mode 0600, in a 0700
    folder). On 127.0.0.1 any local user could reach it, and it has no authentication: whoever can load a
    config there can serve the data dir, keys included."""
    return caddy_home(config) / "admin.sock"


def admin_address(config: Config) -> str:
    """Where the controller reaches Caddy's admin API: the socket when supervised, else ``edge.admin``."""
    return f"unix/{admin_socket(config)}" if config.edge.supervise else config.edge.admin


def edge_settings(config: Config) -> EdgeSettings:
    edge = config.edge
    supervised = edge.supervise
    app = edge.app or str(config.server.listen_address.dialable())
    tls = edge.tls
    return EdgeSettings(
        listen=edge.listen,
        admin_listen=f"{admin_address(config)}|0600" if supervised else edge.admin_listen or edge.admin,
        app=app,
        tls_mode=tls.mode,
        hostname=edge.hostname,
        cert_file=str(tls.cert_file) if tls.cert_file else None,
        key_file=str(tls.key_file) if tls.key_file else None,
        email=tls.email,
        http_redirect=edge.http_redirect,
        max_body=edge.max_body,
        storage=str(caddy_home(config) / "data") if supervised else None,
        log_file=str(caddy_home(config) / "caddy.log") if supervised else None,
        # Supervised, edge.admin (loopback) serves only Caddy's metrics: the admin API itself is the socket.
        metrics_listen=edge.admin if supervised else None,
    )


def https_url(config: Config) -> str:
    listen = config.edge.listen_address.dialable()
    shown = config.edge.hostname or listen.url_host
    return f"https://{shown}:{listen.port}" if listen.port != 443 else f"https://{shown}"


class Edge:
    def __init__(self, config: Config, publish: Callable[[EdgeChanged], None], spawn_caddy: bool = True) -> None:
        """``spawn_caddy`` false: with ``edge.supervise`` the Caddy child is another process's (``serve``'s
        supervisor, which outlives a controller that restarts); this one only configures it."""
        settings = edge_settings(config)
        self.url = https_url(config)
        admin = CaddyAdmin(admin_address(config))
        self.sync = EdgeSync(settings, admin, publish, config.edge.reconcile_interval)
        self.child: CaddyChild | CaddyWatch | None = None
        if config.edge.supervise and spawn_caddy:
            binary = find_caddy(config.edge.binary)
            self.child = CaddyChild(
                binary, caddy_home(config), settings.admin_listen, self.sync.changed, self.sync.down
            )
        elif config.edge.supervise:
            self.child = CaddyWatch(caddy_home(config), self.sync.changed, self.sync.down)

    @property
    def status(self) -> EdgeStatus:
        return self.sync.status

    async def start(self) -> None:
        if self.child is not None:
            await self.child.start()
            self.sync.changed()  # Caddy takes a moment to open its admin API: the first push waits for it
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
