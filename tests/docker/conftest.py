"""The docker tier: a real Docker Engine (scripts/docker-engine.sh starts one; CI always has it) and images
built on this machine by `llamacontroller images build` — no registry is reachable here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from llamacontroller import images
from tests.support.server import llama_server_or_skip, require

# testcontainers: its reaper image cannot be pulled here, and this machine looks like a container to it.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except Exception as exc:
        require(False, f"no Docker Engine answers ({exc.__class__.__name__}): run scripts/docker-engine.sh")
        raise
    yield client
    client.close()


@pytest.fixture(scope="session")
def llama_server_image(engine: docker.DockerClient) -> str:
    """Built once per session from this install's llama-server (the build takes seconds once cached)."""
    llama_server_or_skip()
    images.build(["llama-server"], images_source())
    return images.LLAMA_SERVER_IMAGE


@pytest.fixture(scope="session")
def app_image(engine: docker.DockerClient) -> str:
    """Built once per session, always: it carries this checkout's code."""
    images.build(["app"], images_source())
    return images.APP_IMAGE


@pytest.fixture(scope="session")
def edge_image(engine: docker.DockerClient) -> str:
    images.build(["edge"], images_source())
    return images.EDGE_IMAGE


def images_source() -> Path:
    return images.INSTALLED_TREE  # what `llamacontroller images build` uses


@pytest.fixture(autouse=True)
def _marked(request: pytest.FixtureRequest) -> None:
    request.node.add_marker(pytest.mark.docker)
