"""One contract, two stores: the same tests against a real SQLite file and a real redis-server (with, for SQLite,
the counters in their own SQLite file)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from common.errors import Conflict, NotFound
from controller.store.base import (
    MAX_AUDIT_DETAIL,
    MAX_AUDIT_TEXT,
    MAX_COUNTER_KEY,
    MAX_SESSIONS_PER_USER,
    AuditEvent,
    Ephemeral,
    SessionRecord,
    Store,
    TokenRecord,
    User,
)
from controller.store.ephemeral_sqlite import SqliteEphemeral, ephemeral_path
from controller.store.redis import RedisEphemeral, RedisStore
from controller.store.sqlite import MIGRATIONS, SqliteStore
from tests.support.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Ephemeral]]:
    if request.param == "sqlite":
        store: Store = SqliteStore(tmp_path / "store.db")
        ephemeral: Ephemeral = SqliteEphemeral(ephemeral_path(tmp_path / "store.db"))
    else:
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        redis_store = RedisStore(url)
        store, ephemeral = redis_store, RedisEphemeral(redis_store)
    await store.open()
    yield store, ephemeral
    await ephemeral.close()
    await store.close()


def token(token_id: str = "0123456789abcdef", **changes: object) -> TokenRecord:
    base = TokenRecord(
        id=token_id,
        name="laptop",
        owner="alice",
        secret_hash="ab" * 32,
        scopes=("inference",),
        models=("gemma3*",),
        expires_at=None,
        created_at=time.time(),
        rpm=60,
    )
    return TokenRecord(**{**base.__dict__, **changes})  # type: ignore[arg-type]


async def test_store_users(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    await store.add_user(User("bob", "hash-b", "user", False, 2.0))
    await store.add_user(User("alice", "hash-a", "admin", False, 1.0))
    with pytest.raises(Conflict):
        await store.add_user(User("alice", "other", "user", False, 3.0))
    assert await store.get_user("alice") == User("alice", "hash-a", "admin", False, 1.0)
    assert await store.get_user("nobody") is None
    assert [u.name for u in await store.list_users()] == ["alice", "bob"]
    updated = await store.update_user("bob", password_hash="hash-b2", disabled=True, role="admin")
    assert updated == User("bob", "hash-b2", "admin", True, 2.0)
    with pytest.raises(NotFound):
        await store.update_user("nobody", disabled=True)


async def test_store_user_model_allow_lists(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    await store.add_user(User("carol", "hash-c", "user", False, 1.0, ("gemma3*",)))
    assert (await store.get_user("carol")) == User("carol", "hash-c", "user", False, 1.0, ("gemma3*",))
    changed = await store.update_user("carol", models=("a", "b:*"))
    assert changed.models == ("a", "b:*")
    cleared = await store.update_user("carol", models=())
    assert cleared.models == () and (await store.list_users())[0].models == ()


async def test_store_tokens(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    await store.add_user(User("alice", "h", "admin", False, 1.0))
    record = token()
    await store.add_token(record)
    assert await store.get_token(record.id) == record
    assert await store.get_token("ffffffffffffffff") is None
    assert [t.id for t in await store.list_tokens()] == [record.id]
    assert await store.revoke_token(record.id) is True
    assert await store.revoke_token("ffffffffffffffff") is False
    await store.touch_token(record.id, 123.0)
    stored = await store.get_token(record.id)
    assert stored is not None and stored.revoked and stored.last_used_at == 123.0
    assert "secret_hash" not in stored.public()
    child = token("fedcba9876543210", made_by=record.id)
    await store.add_token(child)
    assert await store.get_token(child.id) == child, "which token made it is kept"


async def test_store_touch_never_undoes_a_concurrent_revocation(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    await store.add_user(User("alice", "h", "admin", False, 1.0))
    await store.add_token(token())
    await asyncio.gather(*(store.touch_token(token().id, float(i)) for i in range(20)), store.revoke_token(token().id))
    stored = await store.get_token(token().id)
    assert stored is not None and stored.revoked


async def test_store_sessions(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    await store.add_user(User("alice", "h", "admin", False, 1.0))
    now = time.time()
    live, other, stale = (
        SessionRecord("a" * 64, "alice", now, now + 60),
        SessionRecord("b" * 64, "alice", now, now + 60),
        SessionRecord("c" * 64, "alice", now - 10, now - 1),
    )
    for session in (live, other, stale):
        await store.add_session(session)
    assert await store.get_session(live.id_hash) == live
    assert await store.get_session(stale.id_hash) is None
    await store.delete_session(live.id_hash)
    assert await store.get_session(live.id_hash) is None
    await store.delete_user_sessions("alice")
    assert await store.get_session(other.id_hash) is None


async def test_store_audit_newest_first(backend: tuple[Store, Ephemeral]) -> None:
    store, _ = backend
    for index in range(5):
        await store.add_audit(AuditEvent(float(index), "login", "alice", "alice", {"n": index}))
    events = await store.list_audit(limit=3)
    assert [e.detail["n"] for e in events] == [4, 3, 2] and events[0].action == "login"


async def test_ephemeral_token_bucket_limits_then_refills(backend: tuple[Store, Ephemeral]) -> None:
    _, ephemeral = backend
    waits = [await ephemeral.take("token:x", 120) for _ in range(121)]
    assert waits[:120] == [0.0] * 120 and 0 < waits[120] <= 0.51
    await asyncio.sleep(waits[120] + 0.05)
    assert await ephemeral.take("token:x", 120) == 0.0
    assert await ephemeral.take("token:other", 120) == 0.0  # buckets are per key


async def test_ephemeral_failures_and_nonces(backend: tuple[Store, Ephemeral]) -> None:
    _, ephemeral = backend
    assert await ephemeral.failures("login:a") == 0
    assert [await ephemeral.add_failure("login:a", 60) for _ in range(3)] == [1, 2, 3]
    assert await ephemeral.failures("login:a") == 3
    await ephemeral.clear_failures("login:a")
    assert await ephemeral.failures("login:a") == 0
    await ephemeral.add_failure("login:b", 1)
    await asyncio.sleep(1.1)
    assert await ephemeral.failures("login:b") == 0, "failures expire with their window"
    assert await ephemeral.claim_nonce("n1", 5) is True
    assert await ephemeral.claim_nonce("n1", 5) is False
    assert await ephemeral.claim_nonce("n2", 5) is True


async def test_store_sqlite_migrations_are_versioned_and_reopen_keeps_data(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.add_user(User("alice", "h", "admin", False, 1.0))
    await store.close()
    reopened = SqliteStore(tmp_path / "s.db")
    await reopened.open()
    assert await reopened.get_user("alice") is not None
    await reopened.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


async def test_store_sqlite_files_are_private_from_the_first_write(tmp_path: Path) -> None:
    """The write-ahead log holds password hashes as soon as a user is added: never readable by others, even in
    a data dir made 0755 by someone else and with a permissive umask."""
    import os

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        store = SqliteStore(shared / "s.db")
        await store.open()
        await store.add_user(User("alice", "argon2-hash-here", "admin", False, 1.0))
        files = {path.name: path.stat().st_mode & 0o777 for path in shared.iterdir()}
        await store.close()
    finally:
        os.umask(old)
    assert {"s.db-wal", "s.db-shm"} <= set(files), files
    assert all(mode == 0o600 for mode in files.values()), files


async def test_store_sqlite_upgrade_from_version_1_keeps_users(tmp_path: Path) -> None:
    """A store written before user allow-lists (version 1) opens, upgrades, and keeps its users."""
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO users VALUES ('alice', 'h', 'admin', 0, 1.0)")
        db.execute("PRAGMA user_version=1")
    store = SqliteStore(tmp_path / "old.db")
    await store.open()
    assert await store.get_user("alice") == User("alice", "h", "admin", False, 1.0, ())
    await store.close()


async def test_store_redis_graceful_restart_loses_nothing(tmp_path: Path) -> None:
    from controller.runtime.process import free_port

    port = free_port()
    with redis_server(tmp_path / "aof", aof=True, port=port) as url:
        store = RedisStore(url)
        await store.open()
        await store.add_user(User("alice", "h", "admin", False, 1.0))
        await store.add_token(token())
        await store.revoke_token(token().id)
        await store.close()
        redis.Redis.from_url(url).shutdown()  # graceful: flushes the AOF
    with redis_server(tmp_path / "aof", aof=True, port=port) as url:
        store = RedisStore(url)
        await store.open()
        assert await store.get_user("alice") is not None
        stored = await store.get_token(token().id)
        assert stored is not None and stored.revoked
        await store.close()


async def test_store_bounds_every_stored_field_by_size(backend: tuple[Store, Ephemeral], tmp_path: Path) -> None:
    """Audit events and counters keep a bounded size whatever a caller hands them (a sign-in once stored a
    20 MB user name in both)."""
    store, ephemeral = backend
    huge = "é" * 1_000_000
    for index in range(5):
        await store.add_audit(AuditEvent(float(index), huge, huge, huge, {"name": huge, "n": index}))
        assert await ephemeral.add_failure(f"login:{huge}{index}", 60) == 1
        assert await ephemeral.take(f"token:{huge}{index}", 10) == 0.0
        assert await ephemeral.claim_nonce(f"{huge}{index}", 5) is True
    assert await ephemeral.failures(f"login:{huge}0") == 1, "long keys still count, each apart"
    assert await ephemeral.claim_nonce(f"{huge}0", 5) is False
    events = await store.list_audit(10)
    assert len(events) == 5 and events[0].at == 4.0
    for event in events:
        assert max(len(event.action), len(event.actor), len(event.target)) <= MAX_AUDIT_TEXT
        assert len(json.dumps(event.detail)) <= 2 * MAX_AUDIT_DETAIL
        assert event.actor.startswith("éé")
    if isinstance(store, SqliteStore):
        size = sum(path.stat().st_size for path in tmp_path.glob("store*.db*"))  # the counters' file too
        assert size < 1_000_000, f"{size} bytes for 5 events with 4 MB of text each"
        assert isinstance(ephemeral, SqliteEphemeral)
        with sqlite3.connect(ephemeral.path) as db:
            for table in ("failures", "buckets", "nonces"):
                longest = db.execute(f"SELECT count(*), max(length(key)) FROM {table}").fetchone()
                assert longest[0] == 5 and longest[1] <= MAX_COUNTER_KEY, table
    else:
        assert isinstance(store, RedisStore)
        keys = await store.client.keys("*")
        assert keys and max(len(key) for key in keys) <= MAX_COUNTER_KEY + 20
        used = sum([await store.client.memory_usage(key) or 0 for key in keys])
        assert used < 1_000_000, f"{used} bytes for 5 events with 4 MB of text each"


async def test_store_user_names_ignore_case(backend: tuple[Store, Ephemeral]) -> None:
    """`Admin` and `admin` could both be added, and signing in needed the exact spelling."""
    store, _ = backend
    await store.add_user(User("Alice", "h", "user", False, 1.0))
    for other in ("alice", "ALICE", "Alice"):
        with pytest.raises(Conflict, match="user names ignore case"):
            await store.add_user(User(other, "x", "admin", False, 2.0))
    assert await store.get_user("aLiCe") == User("Alice", "h", "user", False, 1.0)
    changed = await store.update_user("ALICE", disabled=True)
    assert changed == User("Alice", "h", "user", True, 1.0)
    assert await store.list_users() == [changed]


async def test_store_sqlite_upgrade_keeps_names_that_differ_only_in_case(tmp_path: Path) -> None:
    """Names written before they ignored case: each keeps its exact spelling; another spelling reaches the
    lower-case one; no new one may join them."""
    with sqlite3.connect(tmp_path / "old.db") as db:
        for script in MIGRATIONS[:2]:
            db.executescript(script)
        for name, role in (("Admin", "admin"), ("admin", "user"), ("Bob", "user")):
            db.execute("INSERT INTO users VALUES (?, 'h', ?, 0, 1.0, '[]')", (name, role))
        db.execute("PRAGMA user_version=2")
    store = SqliteStore(tmp_path / "old.db")
    await store.open()
    await check_names_that_differ_only_in_case(store)
    await store.close()


async def test_store_redis_upgrade_keeps_names_that_differ_only_in_case(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    client.set("lc:schema", 1)
    for name, role in (("Admin", "admin"), ("admin", "user"), ("Bob", "user")):
        fields = {"name": name, "password_hash": "h", "role": role, "disabled": "0", "created_at": "1.0"}
        client.hset(f"lc:user:{name}", mapping=fields)  # type: ignore[arg-type]
        client.sadd("lc:users", name)
    store = RedisStore(redis_url)
    await store.open()
    assert client.get("lc:schema") == "2" and client.exists("lc:user:bob") and not client.exists("lc:user:Bob")
    await check_names_that_differ_only_in_case(store)
    await store.close()


async def check_names_that_differ_only_in_case(store: Store) -> None:
    assert [(u.name, u.role) for u in await store.list_users()] == [
        ("Admin", "admin"),
        ("Bob", "user"),
        ("admin", "user"),
    ]
    assert (await store.get_user("Admin")).role == "admin"  # type: ignore[union-attr]
    assert (await store.get_user("admin")).role == "user"  # type: ignore[union-attr]
    assert (await store.get_user("ADMIN")).name == "admin"  # type: ignore[union-attr]
    assert (await store.get_user("bob")).name == "Bob"  # type: ignore[union-attr]
    assert (await store.update_user("Admin", disabled=True)).name == "Admin"
    assert (await store.get_user("admin")).disabled is False  # type: ignore[union-attr]
    with pytest.raises(Conflict):
        await store.add_user(User("BOB", "x", "user", False, 2.0))
    with pytest.raises(Conflict):
        await store.add_user(User("aDmIn", "x", "user", False, 2.0))


async def test_store_keeps_a_bounded_number_of_sessions_per_user(backend: tuple[Store, Ephemeral]) -> None:
    """Every sign-in added a session that stayed until it expired (and, in Redis, an index entry that stayed
    for good): a user signing in in a loop grew the store without bound."""
    store, _ = backend
    await store.add_user(User("alice", "h", "admin", False, 1.0))
    now = time.time()
    stale = SessionRecord("f" * 64, "alice", now - 10, now + 0.5)
    await store.add_session(stale)
    await asyncio.sleep(1.1)
    sessions = [SessionRecord(f"{index:064x}", "alice", now + index, now + 600) for index in range(25)]
    for session in sessions:
        await store.add_session(session)
    kept = [session for session in sessions if await store.get_session(session.id_hash) == session]
    assert kept == sessions[-MAX_SESSIONS_PER_USER:], "the newest stay, the oldest end"
    if isinstance(store, RedisStore):
        index = await store.client.smembers("lc:user-sessions:alice")
        assert index == {session.id_hash for session in kept}, "ended and expired ones leave the index"
