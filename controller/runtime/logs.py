"""Per-model ring buffers of backend log lines, with live followers (for ``logs?follow=1`` and the UI)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_CAPACITY = 2000
START_MARKER = "[llamacontroller] started"  # written before each backend start, so its own lines can be told apart
_FOLLOWER_BACKLOG = 1000
ROTATE_BYTES = 8 * 2**20  # a model's log file moves to .log.1 past this size
MAX_LINE_BYTES = 64 * 1024


def rotated(path: Path) -> Path:
    return path.with_suffix(".log.1")


_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([A-Z]) ")


def log_hint(lines: list[str], last_resort: bool = True) -> str:
    """``": <first error line>"`` from llama-server's log since the last start marker, or ``""``; with
    ``last_resort`` the last line when no line looks like an error (a start that failed says why there)."""
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(START_MARKER):
            lines = lines[index + 1 :]
            break
    errors = [line for line in lines if (m := _LOG_PREFIX.match(line)) and m.group(1) == "E"]
    errors = errors or [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    chosen = errors[0] if errors else (lines[-1] if lines and last_resort else "")
    chosen = _LOG_PREFIX.sub("", chosen).strip()
    return f": {chosen[:300]}" if chosen else ""


class LineSplitter:
    """A backend's output as it comes (in chunks of any size) in, whole lines out: decoded (bad UTF-8 replaced),
    the CR of a CRLF dropped. A line longer than MAX_LINE_BYTES is cut there: output without a newline must not
    grow memory without bound. Every runtime's log follower reads through one."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        pieces = (self._partial + data).split(b"\n")
        self._partial = pieces.pop()
        while len(self._partial) > MAX_LINE_BYTES:
            pieces.append(self._partial[:MAX_LINE_BYTES])
            self._partial = self._partial[MAX_LINE_BYTES:]
        return [piece.decode("utf-8", "replace").rstrip("\r") for piece in pieces]

    def rest(self) -> list[str]:
        """What came after the last newline (output that ended without one)."""
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", "replace").rstrip("\r")] if rest else []


class LogFile:
    """Appends lines to a model's log file (rotated at ROTATE_BYTES); safe to use from a thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            if self._path.exists() and self._path.stat().st_size > ROTATE_BYTES:
                self._path.replace(rotated(self._path))
            with self._path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def last_written(path: Path) -> float | None:
    """When ``path`` was last written (seconds since the epoch), None when it does not exist. An adopted backend's
    output is followed from here: what came before is in the file; what came while no controller ran is not.
    (The backend's clock and the data dir's agree on one host; across a cluster they agree as far as NTP does.)"""
    for part in (path, rotated(path)):
        with contextlib.suppress(FileNotFoundError):
            return part.stat().st_mtime
    return None


async def read_log(path: Path, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The whole log of a model: the rotated part first, then the current file."""
    for part in (rotated(path), path):
        if not part.exists():
            continue
        with part.open("rb") as handle:
            while data := await asyncio.to_thread(handle.read, chunk):
                yield data


class LogBook:
    """Keeps the last lines of each model's backend, across restarts, so a failed model shows its cause."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._lines: dict[str, deque[str]] = {}
        self._followers: dict[str, set[asyncio.Queue[str]]] = {}

    def append(self, model: str, line: str) -> None:
        self._lines.setdefault(model, deque(maxlen=self._capacity)).append(line)
        for queue in self._followers.get(model, ()):
            if queue.qsize() < _FOLLOWER_BACKLOG:  # a slow follower loses lines, never stalls the backend
                queue.put_nowait(line)

    def tail(self, model: str, count: int) -> list[str]:
        lines = self._lines.get(model)
        if not lines or count <= 0:
            return []
        return list(lines)[-count:]

    @contextmanager
    def subscription(self, model: str) -> Iterator[asyncio.Queue[str]]:
        """A queue that receives each new line of ``model`` while the block runs."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        followers = self._followers.setdefault(model, set())
        followers.add(queue)
        try:
            yield queue
        finally:
            followers.discard(queue)
