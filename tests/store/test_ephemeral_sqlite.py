"""The SQLite counters are shared by the processes of one host: a limit is the host's, not each process's."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import Unavailable
from controller.config import validate_config
from controller.store import ephemeral_sqlite, make_store
from controller.store.ephemeral_sqlite import SqliteEphemeral, ephemeral_path

ROOT = Path(__file__).resolve().parents[2]

# One process: wait for the common start, then try ``tries`` takes; print how many were allowed. The clock
# stands still (the same instant in every process), so no token refills while they race.
TAKER = """
import asyncio, sys, time
from pathlib import Path
from controller.store.ephemeral_sqlite import SqliteEphemeral

path, start, tries, per_minute = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

async def main() -> None:
    counters = SqliteEphemeral(path, clock=lambda: start)
    await counters.failures("warm")  # open the file before the start
    time.sleep(max(0.0, start - time.time()))
    allowed = [await counters.take("token:shared", per_minute) for _ in range(tries)].count(0.0)
    await counters.close()
    print(allowed)

asyncio.run(main())
"""


def test_ephemeral_sqlite_processes_share_one_bucket(tmp_path: Path) -> None:
    """Four processes taking from one bucket of 150 a minute get 150 between them, not 150 each."""
    path, per_minute, processes, tries = tmp_path / "counters.db", 150, 4, 100
    start = time.time() + 2.0  # every process has started and opened the file by then
    command = [sys.executable, "-c", TAKER, str(path), repr(start), str(tries), str(per_minute)]
    takers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    allowed = [int(taker.communicate(timeout=60)[0]) for taker in takers]
    assert all(taker.returncode == 0 for taker in takers)
    assert sum(allowed) == per_minute, allowed


async def test_ephemeral_sqlite_failures_and_nonces_are_shared(tmp_path: Path) -> None:
    """Two instances on one file (two connections, as two processes have) see each other's counts."""
    one, two = SqliteEphemeral(tmp_path / "c.db"), SqliteEphemeral(tmp_path / "c.db")
    assert await one.add_failure("login:a", 60) == 1
    assert await two.add_failure("login:a", 60) == 2
    assert await one.failures("login:a") == 2 and await two.failures("login:a") == 2
    await two.clear_failures("login:a")
    assert await one.failures("login:a") == 0
    assert await one.claim_nonce("n", 5) is True
    assert await two.claim_nonce("n", 5) is False, "a nonce used through one process is spent for all"
    await one.close()
    await two.close()


async def test_ephemeral_sqlite_expiry_follows_its_clock(tmp_path: Path) -> None:
    now = [1000.0]
    counters = SqliteEphemeral(tmp_path / "c.db", clock=lambda: now[0])
    assert [await counters.take("token:t", 2) for _ in range(3)] == [0.0, 0.0, 30.0]
    now[0] -= 10.0  # the wall clock stepped back: the bucket waits, it does not sink below empty
    assert await counters.take("token:t", 2) == 30.0
    now[0] += 40.0
    assert await counters.take("token:t", 2) == 0.0, "refilled after the wait it named"
    await counters.add_failure("login:a", 60)
    await counters.claim_nonce("n", 5)
    now[0] += 5.0
    assert await counters.claim_nonce("n", 5) is True, "a nonce past its ttl may come again"
    now[0] += 55.0
    assert await counters.failures("login:a") == 0
    assert await counters.add_failure("login:a", 60) == 1, "a new window"
    await counters.close()


async def test_ephemeral_sqlite_tables_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys come from clients: expired rows are swept, and past the cap the ones nearest their expiry go."""
    monkeypatch.setattr(ephemeral_sqlite, "_MAX_ROWS", 20)
    monkeypatch.setattr(ephemeral_sqlite, "_PRUNE_EVERY", 10)
    now = [1000.0]
    counters = SqliteEphemeral(tmp_path / "c.db", clock=lambda: now[0])
    for index in range(100):
        await counters.add_failure(f"login:{index}", 60 + index)
        await counters.claim_nonce(f"n{index}", 1)
    with sqlite3.connect(tmp_path / "c.db") as db:
        assert db.execute("SELECT count(*) FROM failures").fetchone()[0] <= 20 + 10
    assert await counters.failures("login:99") == 1, "the latest to expire are kept"
    assert await counters.failures("login:0") == 0, "the first to expire went"
    now[0] += 2.0
    for index in range(10):
        await counters.take(f"token:{index}", 5)  # enough writes for a sweep
    with sqlite3.connect(tmp_path / "c.db") as db:
        assert db.execute("SELECT count(*) FROM nonces").fetchone()[0] == 0, "expired nonces swept"
    await counters.close()


async def test_ephemeral_sqlite_file_is_private_and_opened_on_first_use(tmp_path: Path) -> None:
    """The counters' file lies beside the store's with its mode (0600, the WAL files too); a process that
    never counts (the CLI) never makes it."""
    config = validate_config({"server": {"data_dir": str(tmp_path / "data")}})
    _, counters = make_store(config)
    assert isinstance(counters, SqliteEphemeral) and counters.path == ephemeral_path(config.store_path)
    assert counters.path == tmp_path / "data" / "llamacontroller-ephemeral.db"
    assert not counters.path.exists()
    old = os.umask(0o022)
    try:
        await counters.take("token:t", 5)
    finally:
        os.umask(old)
    files = {path.name: path.stat().st_mode & 0o777 for path in counters.path.parent.iterdir()}
    assert {"llamacontroller-ephemeral.db", "llamacontroller-ephemeral.db-wal"} <= set(files), files
    assert all(mode == 0o600 for mode in files.values()), files
    await counters.close()


async def test_ephemeral_sqlite_unusable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "c.db").write_text(json.dumps({"not": "a database"}) * 100)
    counters = SqliteEphemeral(tmp_path / "c.db")
    with pytest.raises(Unavailable, match="counters"):
        await counters.take("token:t", 5)
    await counters.close()


async def test_ephemeral_sqlite_calls_wait_off_the_loop(tmp_path: Path) -> None:
    """Another process holding the write lock makes a take wait in its thread, not on the event loop."""
    counters = SqliteEphemeral(tmp_path / "c.db")
    await counters.take("token:t", 5)
    holder = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiting = asyncio.create_task(counters.take("token:t", 5))
    for _ in range(20):  # the loop keeps turning while the take waits for the lock (busy_timeout: 5 s)
        await asyncio.sleep(0.01)
    assert not waiting.done()
    holder.execute("COMMIT")
    holder.close()
    assert await waiting == 0.0
    await counters.close()


async def test_ephemeral_sqlite_a_cancelled_call_finishes_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A take cancelled mid-transaction (its client gone) still owns the connection until it is done: the next
    call must not run its statements inside that transaction."""
    inside: list[str] = []
    overlapped: list[bool] = []
    real_take = ephemeral_sqlite._take

    def slow_take(db: sqlite3.Connection, key: str, per_minute: int, now: float) -> float:
        overlapped.append(bool(inside))
        inside.append(key)
        time.sleep(0.2)
        try:
            return real_take(db, key, per_minute, now)
        finally:
            inside.remove(key)

    monkeypatch.setattr(ephemeral_sqlite, "_take", slow_take)
    counters = SqliteEphemeral(tmp_path / "c.db", clock=lambda: 1000.0)
    cancelled = asyncio.create_task(counters.take("token:t", 5))
    await asyncio.sleep(0.05)  # its thread is inside now
    cancelled.cancel()
    assert await counters.take("token:t", 5) == 0.0
    assert overlapped == [False, False]
    monkeypatch.setattr(ephemeral_sqlite, "_take", real_take)
    assert [await counters.take("token:t", 5) for _ in range(4)] == [0.0, 0.0, 0.0, 12.0], "the cancelled one counted"
    await counters.close()


def _take_in_child(counters: SqliteEphemeral) -> None:
    allowed = asyncio.run(counters.take("token:t", 2)) == 0.0
    refused = asyncio.run(counters.take("token:t", 2)) > 0
    os._exit(0 if allowed and refused else 1)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_ephemeral_sqlite_works_in_a_process_forked_after_use(tmp_path: Path) -> None:
    """A worker forked from a process that has counted opens its own connection and thread: the parent's
    thread does not exist there (a call would wait for it for ever) and its connection must not be shared."""
    counters = SqliteEphemeral(tmp_path / "c.db", clock=lambda: 1000.0)
    assert asyncio.run(counters.take("token:t", 2)) == 0.0
    child = multiprocessing.get_context("fork").Process(target=_take_in_child, args=(counters,))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert asyncio.run(counters.take("token:t", 2)) > 0, "the parent sees the child's take"
    asyncio.run(counters.close())
