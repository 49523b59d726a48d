"""Test-only images built on this machine (no registry): a Redis image from Debian's redis-server."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import docker

from llamacontroller.images import shared_libraries

REDIS_IMAGE = "llamacontroller-test/redis:local"


def build_redis_image(client: docker.DockerClient) -> str:
    """FROM scratch + /usr/bin/redis-server and the libraries it links."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/system-deps.sh installs it)")
    with tempfile.TemporaryDirectory() as folder:
        rootfs = Path(folder) / "rootfs"
        for path in [Path(binary).resolve(), *shared_libraries([Path(binary)])]:
            target = rootfs / str(path).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target, follow_symlinks=True)
        (rootfs / "usr" / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(binary).resolve(), rootfs / "usr" / "bin" / "redis-server")
        (rootfs / "data").mkdir()
        (Path(folder) / "Dockerfile").write_text(
            "FROM scratch\nCOPY rootfs/ /\nWORKDIR /data\nEXPOSE 6379\n"
            'ENTRYPOINT ["/usr/bin/redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", ""]\n'
        )
        client.images.build(path=folder, tag=REDIS_IMAGE, rm=True, forcerm=True)
    return REDIS_IMAGE
