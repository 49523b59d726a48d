"""Ephemeral counters in a SQLite file shared by every process of one host: token buckets, failures, nonces.

The file lies beside the store's (``<store>-ephemeral.db``), not in it: SQLite has one writer per file, and
a rate-limited request writes its bucket, so the hot counters would otherwise queue behind (and hold up) user,
token, session and audit writes. Its contents are disposable — nothing to migrate or back up.

Times are wall-clock (``time.time``), like Redis's: the file outlives a reboot, and a monotonic clock restarts
near zero at boot, which would leave every stored expiry far in the future. A clock stepped back only delays
expiry (a bucket never refills by a negative time).

Each call is one short transaction on one connection, run off the event loop as the store's are, but in a
thread of its own (a one-thread executor) rather than under an asyncio lock around ``to_thread``: a request
cancelled mid-call (a client gone) releases such a lock while its thread is still inside the transaction, and
the next call would then share the connection; an executor's queue holds it until the first is done. A
read-modify-write starts with ``BEGIN IMMEDIATE`` (the write lock first), so two processes cannot both read
the last token; a single UPSERT takes that lock by itself.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from common.errors import Unavailable
from controller.store.base import counter_key
from controller.store.sqlite import connect_private

T = TypeVar("T")

_MAX_ROWS = 100_000  # per table: bounded by count here and by size in counter_key, as keys come from clients
_PRUNE_EVERY = 1_000  # writes by one process between sweeps of expired rows (and of rows past _MAX_ROWS)
_TABLES = ("buckets", "failures", "nonces")
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE failures (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE nonces (key TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE INDEX buckets_by_expiry ON buckets (expires);
CREATE INDEX failures_by_expiry ON failures (expires);
CREATE INDEX nonces_by_expiry ON nonces (expires)
"""


def ephemeral_path(store_path: Path) -> Path:
    """Where the counters of the store at ``store_path`` live."""
    return store_path.with_name(f"{store_path.stem}-ephemeral.db")


def _connect(path: Path) -> sqlite3.Connection:
    db = connect_private(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        with db:
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:  # disposable: start afresh
                for table in _TABLES:
                    db.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in _SCHEMA.split(";"):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _take(db: sqlite3.Connection, key: str, per_minute: int, now: float) -> float:
    capacity = float(per_minute)
    db.execute("BEGIN IMMEDIATE")
    with db:  # commit on success, roll back on error
        row = db.execute("SELECT tokens, updated FROM buckets WHERE key = ?", (key,)).fetchone()
        tokens = capacity if row is None else min(capacity, row[0] + max(0.0, now - row[1]) * capacity / 60.0)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) * 60.0 / capacity
        # Empty to full takes 60 s: a row untouched that long is the same as none.
        db.execute("REPLACE INTO buckets VALUES (?, ?, ?, ?)", (key, tokens, now, now + 60.0))
    return wait


def _add_failure(db: sqlite3.Connection, key: str, window: float, now: float) -> int:
    row = db.execute(
        "INSERT INTO failures VALUES (:key, 1, :expires) ON CONFLICT (key) DO UPDATE SET"
        " count = CASE WHEN expires > :now THEN count + 1 ELSE 1 END,"
        " expires = CASE WHEN expires > :now THEN expires ELSE :expires END RETURNING count",
        {"key": key, "expires": now + window, "now": now},
    ).fetchone()
    return int(row[0])


def _claim_nonce(db: sqlite3.Connection, nonce: str, ttl: float, now: float) -> bool:
    claimed = db.execute(
        "INSERT INTO nonces VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET expires = excluded.expires"
        " WHERE nonces.expires <= ?",  # a live nonce stays as it is: a replay changes no row
        (nonce, now + ttl, now),
    ).rowcount
    return claimed == 1


def _prune(db: sqlite3.Connection, now: float) -> None:
    """Expired rows go; past ``_MAX_ROWS``, those nearest their expiry go too."""
    db.execute("BEGIN IMMEDIATE")
    with db:
        for table in _TABLES:  # names from the fixed tuple above
            db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))  # noqa: S608
            db.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} ORDER BY expires"  # noqa: S608
                f" LIMIT max(0, (SELECT count(*) FROM {table}) - ?))",
                (_MAX_ROWS,),
            )


class SqliteEphemeral:
    """Counters every process on the host shares through one file; opened on first use."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._writes = 0
        self._pid = os.getpid()
        self._inherited: list[object] = []

    async def _run(self, work: Callable[[sqlite3.Connection, float], T], *, grows: bool = True) -> T:
        if self._pid != os.getpid():
            self._forked()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="ephemeral-sqlite")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, work, grows)
        except sqlite3.DatabaseError as exc:  # locked past busy_timeout, disk full, not a database
            raise Unavailable(f"the rate-limit counters (sqlite) are unavailable: {exc}") from exc

    def _call(self, work: Callable[[sqlite3.Connection, float], T], grows: bool) -> T:
        """In the thread: the work, and a sweep after every ``_PRUNE_EVERY`` calls that may add a row."""
        if self._db is None:
            self._db = _connect(self.path)
            _prune(self._db, self._clock())
        now = self._clock()
        result = work(self._db, now)
        if grows:
            self._writes += 1
        if self._writes >= _PRUNE_EVERY:
            self._writes = 0
            _prune(self._db, now)
        return result

    def _forked(self) -> None:
        """In a process forked after use: the parent's thread is gone here and its connection must not be used,
        nor closed (closing would drop this process's locks on the file); both are kept, untouched."""
        self._inherited.append((self._db, self._thread))
        self._db, self._thread, self._pid = None, None, os.getpid()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def take(self, key: str, per_minute: int) -> float:
        key = counter_key(key)
        return await self._run(lambda db, now: _take(db, key, per_minute, now))

    async def failures(self, key: str) -> int:
        key = counter_key(key)
        row = await self._run(
            lambda db, now: db.execute(
                "SELECT count FROM failures WHERE key = ? AND expires > ?", (key, now)
            ).fetchone(),
            grows=False,
        )
        return int(row[0]) if row else 0

    async def add_failure(self, key: str, window: float) -> int:
        key = counter_key(key)
        return await self._run(lambda db, now: _add_failure(db, key, window, now))

    async def clear_failures(self, key: str) -> None:
        key = counter_key(key)
        await self._run(lambda db, now: db.execute("DELETE FROM failures WHERE key = ?", (key,)), grows=False)

    async def claim_nonce(self, nonce: str, ttl: float) -> bool:
        nonce = counter_key(nonce)
        return await self._run(lambda db, now: _claim_nonce(db, nonce, ttl, now))

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)  # after the calls queued
            self._thread.shutdown()
            self._thread = None
