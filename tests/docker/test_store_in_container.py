"""The store contract once more, against Redis in a container (testcontainers; the image built locally)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import docker
import pytest
import redis
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from controller.store.base import Ephemeral, Store
from controller.store.redis import RedisEphemeral, RedisStore
from tests.store import test_store_contract as contract
from tests.support.local_images import build_redis_image

# The contract's own tests, collected here again with the `backend` fixture below.
globals().update({name: getattr(contract, name) for name in dir(contract) if name.startswith("test_store_")})
globals().update({name: getattr(contract, name) for name in dir(contract) if name.startswith("test_ephemeral_")})
del globals()["test_store_sqlite_migrations_are_versioned_and_reopen_keeps_data"]  # SQLite only
del globals()["test_store_sqlite_upgrade_from_version_1_keeps_users"]
del globals()["test_store_redis_graceful_restart_loses_nothing"]  # a local redis-server's files


@pytest.fixture(scope="module")
def redis_url(engine: docker.DockerClient) -> Iterator[str]:
    image = build_redis_image(engine)
    container = DockerContainer(image).with_exposed_ports(6379)
    with container.waiting_for(LogMessageWaitStrategy("Ready to accept connections")):
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[tuple[Store, Ephemeral]]:
    redis.Redis.from_url(redis_url).flushdb()
    store = RedisStore(redis_url)
    await store.open()
    yield store, RedisEphemeral(store)
    await store.close()
