"""Persistent store (users, tokens, sessions, audit) and ephemeral counters; see base.py."""

from __future__ import annotations

from controller.config import Config
from controller.store.base import Ephemeral, Store
from controller.store.ephemeral_sqlite import SqliteEphemeral, ephemeral_path
from controller.store.redis import RedisEphemeral, RedisStore
from controller.store.sqlite import SqliteStore


def make_store(config: Config) -> tuple[Store, Ephemeral]:
    """The configured store and its ephemeral companion (not opened yet: the counters' file opens on first use)."""
    if config.store.kind == "redis":
        store = RedisStore(config.store.redis_url)
        return store, RedisEphemeral(store)
    return SqliteStore(config.store_path), SqliteEphemeral(ephemeral_path(config.store_path))
