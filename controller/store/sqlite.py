"""SQLite store: one file in the data dir, WAL journal, versioned migrations (``PRAGMA user_version``).

One connection, used from one worker thread at a time (an asyncio lock around ``to_thread``), so the
event loop never blocks on disk and writes are serialised. Field-level UPDATEs keep concurrent changes
(a revocation and a last-used touch) from undoing each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common.errors import Conflict, NotFound, Unavailable
from controller.store.base import (
    AUDIT_KEEP,
    MAX_SESSIONS_PER_USER,
    AuditEvent,
    Role,
    SessionRecord,
    TokenRecord,
    User,
    bounded_audit,
    finite_or_none,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        owner TEXT NOT NULL REFERENCES users(name),
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        models TEXT NOT NULL,
        expires_at REAL,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_used_at REAL,
        rpm INTEGER
    );
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX sessions_by_user ON sessions(user);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    # 2: per-user model allow-lists
    """
    ALTER TABLE users ADD COLUMN models TEXT NOT NULL DEFAULT '[]';
    """,
    # 3: user names ignore case (uniqueness is checked on insert: names written before may differ in case only)
    """
    CREATE INDEX users_by_folded_name ON users (name COLLATE NOCASE);
    """,
    # 4: which token made a token (revoking a token revokes those it made)
    """
    ALTER TABLE tokens ADD COLUMN made_by TEXT;
    """,
)
# A name in any case; where names written before differ only in case: the exact spelling, else the
# lower-case one, else the oldest.
_FIND_USER = (
    "SELECT * FROM users WHERE name = ? COLLATE NOCASE ORDER BY name = ? DESC, name = lower(name) DESC, rowid LIMIT 1"
)


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        secret_hash=row["secret_hash"],
        scopes=tuple(json.loads(row["scopes"])),
        models=tuple(json.loads(row["models"])),
        expires_at=finite_or_none(row["expires_at"]),
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        rpm=row["rpm"],
        made_by=row["made_by"],
    )


def _user(row: sqlite3.Row) -> User:
    return User(
        row["name"],
        row["password_hash"],
        row["role"],
        bool(row["disabled"]),
        row["created_at"],
        tuple(json.loads(row["models"])),
    )


def connect_private(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path``, made readable by its owner alone, in WAL mode (the processes of
    one host share it: the controller, the gateways, the CLI), in autocommit (transactions are explicit)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Made 0600 before SQLite opens it: SQLite gives the -wal and -shm files the database file's mode, and the
    # store's hold password hashes (made 0644 under a 0755 data dir, they were readable by all).
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")  # first: another process may be writing, or switching to WAL
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # no fsync per commit: a crash may lose the last commit, no more
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._reported: str | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            db = self._db
            if db is None:
                raise RuntimeError("the store is not open")
            try:
                return await asyncio.to_thread(self._transaction, db, work)
            except sqlite3.OperationalError as exc:  # disk full, read-only, locked past busy_timeout, I/O error
                # The transaction was rolled back: nothing half-written. Reads still work; the caller says so.
                raise Unavailable(f"the store (sqlite) could not complete the change: {exc}") from exc

    @staticmethod
    def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
        with db:  # commit on success, roll back on error
            return work(db)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            db = connect_private(self.path)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, script.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version={number}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            self.path.chmod(0o600)
            db.isolation_level = "DEFERRED"
            opened = os.stat(self.path)
            self._file = (opened.st_dev, opened.st_ino)
            return db

        self._db = await asyncio.to_thread(connect)

    async def problem(self) -> str | None:
        """Whether the file at the path is still the one open (one stat): deleted or replaced while running,
        every write would go to a file that is gone at the next start."""
        if self._file is None:
            return None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            found: str | None = "the store file was deleted while running"
        except OSError as exc:
            found = f"the store file cannot be checked: {exc.strerror}"
        else:
            found = None if (now.st_dev, now.st_ino) == self._file else "the store file was replaced"
        # The answer goes to unauthenticated probes: the path, which says where the data dir lies, only to the log.
        if found is not None and found != self._reported:
            log.error(
                "%s (%s): writes go to the old file and are lost at the next start; restart the controller",
                found,
                self.path,
            )
        self._reported = found
        return found

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                await asyncio.to_thread(self._db.close)
            self._db = None

    # ------------------------------------------------------------------ users

    async def add_user(self, user: User) -> None:
        def work(db: sqlite3.Connection) -> None:
            try:
                # One statement, so no other writer (the CLI) slips in between the check and the insert.
                added = db.execute(
                    "INSERT INTO users (name, password_hash, role, disabled, created_at, models)"
                    " SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM users WHERE name = ? COLLATE NOCASE)",
                    (
                        user.name,
                        user.password_hash,
                        user.role,
                        int(user.disabled),
                        user.created_at,
                        json.dumps(user.models),
                        user.name,
                    ),
                ).rowcount
            except sqlite3.IntegrityError:
                added = 0
            if not added:
                raise Conflict(f"user '{user.name}' exists already (user names ignore case)")

        await self._run(work)

    async def get_user(self, name: str) -> User | None:
        row = await self._run(lambda db: db.execute(_FIND_USER, (name, name)).fetchone())
        return _user(row) if row else None

    async def list_users(self) -> Sequence[User]:
        rows = await self._run(lambda db: db.execute("SELECT * FROM users ORDER BY name").fetchall())
        return [_user(row) for row in rows]

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        disabled: bool | None = None,
        role: Role | None = None,
        models: tuple[str, ...] | None = None,
    ) -> User:
        changes: dict[str, Any] = {}
        if models is not None:
            changes["models"] = json.dumps(list(models))
        if password_hash is not None:
            changes["password_hash"] = password_hash
        if disabled is not None:
            changes["disabled"] = int(disabled)
        if role is not None:
            changes["role"] = role

        def work(db: sqlite3.Connection) -> sqlite3.Row:
            row: sqlite3.Row | None = db.execute(_FIND_USER, (name, name)).fetchone()
            if row is None:
                raise NotFound(f"user '{name}' not found")
            stored = row["name"]
            for column, value in changes.items():  # column names come from the fixed set above
                db.execute(f"UPDATE users SET {column} = ? WHERE name = ?", (value, stored))  # noqa: S608
            found: sqlite3.Row = db.execute("SELECT * FROM users WHERE name = ?", (stored,)).fetchone()
            return found

        row = await self._run(work)
        return _user(row)

    # ------------------------------------------------------------------ tokens

    async def add_token(self, token: TokenRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO tokens (id, name, owner, secret_hash, scopes, models, expires_at, revoked,"
                    " created_at, last_used_at, rpm, made_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        token.id,
                        token.name,
                        token.owner,
                        token.secret_hash,
                        json.dumps(token.scopes),
                        json.dumps(token.models),
                        token.expires_at,
                        int(token.revoked),
                        token.created_at,
                        token.last_used_at,
                        token.rpm,
                        token.made_by,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"cannot add token: {exc}") from None

        await self._run(work)

    async def get_token(self, token_id: str) -> TokenRecord | None:
        row = await self._run(lambda db: db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone())
        return _token(row) if row else None

    async def list_tokens(self) -> Sequence[TokenRecord]:
        rows = await self._run(lambda db: db.execute("SELECT * FROM tokens ORDER BY created_at").fetchall())
        return [_token(row) for row in rows]

    async def revoke_token(self, token_id: str) -> bool:
        cursor = await self._run(lambda db: db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,)))
        return cursor.rowcount > 0

    async def touch_token(self, token_id: str, at: float) -> None:
        await self._run(lambda db: db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (at, token_id)))

    # ------------------------------------------------------------------ sessions

    async def add_session(self, session: SessionRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
            db.execute(
                "INSERT INTO sessions (id_hash, user, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (session.id_hash, session.user, session.created_at, session.expires_at),
            )
            db.execute(
                "DELETE FROM sessions WHERE user = ? AND id_hash NOT IN"
                " (SELECT id_hash FROM sessions WHERE user = ? ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                (session.user, session.user, MAX_SESSIONS_PER_USER),
            )

        await self._run(work)

    async def get_session(self, id_hash: str) -> SessionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT * FROM sessions WHERE id_hash = ? AND expires_at > ?", (id_hash, time.time())
            ).fetchone()
        )
        return SessionRecord(row["id_hash"], row["user"], row["created_at"], row["expires_at"]) if row else None

    async def delete_session(self, id_hash: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)))

    async def delete_user_sessions(self, user: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM sessions WHERE user = ?", (user,)))

    # ------------------------------------------------------------------ audit

    async def add_audit(self, event: AuditEvent) -> None:
        event = bounded_audit(event)

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO audit (at, action, actor, target, detail) VALUES (?, ?, ?, ?, ?)",
                (event.at, event.action, event.actor, event.target, json.dumps(event.detail)),
            )
            db.execute("DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (AUDIT_KEEP,))

        await self._run(work)

    async def list_audit(self, limit: int = 100) -> Sequence[AuditEvent]:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        )
        return [AuditEvent(r["at"], r["action"], r["actor"], r["target"], json.loads(r["detail"])) for r in rows]
