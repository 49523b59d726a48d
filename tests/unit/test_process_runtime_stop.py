"""The process runtime keeps the runtime contract of a level-triggered lifecycle: a stop it cannot confirm raises
(the lifecycle tries again), and ``list_managed`` may be called at any time without disturbing what it runs."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from common.errors import BackendStopFailed
from controller.runtime import process
from controller.runtime.base import LaunchSpec, RuntimeSetup
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime


def stand_in(tmp_path: Path) -> Path:
    """A llama-server stand-in that ignores SIGTERM and prints a line a second."""
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\ntrap '' TERM\nwhile true; do echo tick; sleep 1; done\n")
    binary.chmod(0o700)
    return binary


async def test_a_stop_that_cannot_kill_the_backend_raises_and_a_later_one_succeeds(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(process, "KILL_CONFIRM_TIMEOUT", 0.3)
    binary = stand_in(tmp_path)
    runtime = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: str(binary)))
    backend = await runtime.start(LaunchSpec("a:1b", tmp_path / "a.gguf"))
    pid = int(backend.handle)
    real_signal = ProcessRuntime._signal
    monkeypatch.setattr(ProcessRuntime, "_signal", staticmethod(lambda pid, signum: None))  # EPERM, say
    try:
        with pytest.raises(BackendStopFailed, match="still runs"):
            await runtime.stop(backend, timeout=0.1)
        os.kill(pid, 0)  # it runs on, and it is still in the books
        assert [b.handle for b in await runtime.list_managed()] == [backend.handle]
        monkeypatch.setattr(ProcessRuntime, "_signal", staticmethod(real_signal))
        await runtime.stop(backend, timeout=0.1)
        assert await runtime.list_managed() == []
        assert not (tmp_path / "state" / "run" / "a:1b.json").exists()
    finally:
        real_signal(pid, signal.SIGKILL)
        await runtime.close()


async def test_list_managed_at_any_time_leaves_what_runs_alone(tmp_path: Path) -> None:
    binary = stand_in(tmp_path)
    book = LogBook()
    runtime = ProcessRuntime(RuntimeSetup(tmp_path / "state", book, binary=lambda: str(binary)))
    backend = await runtime.start(LaunchSpec("a:1b", tmp_path / "a.gguf"))
    try:
        for _ in range(3):
            [listed] = await runtime.list_managed()
            assert listed.handle == backend.handle and not listed.adopted  # its own child, not a leftover
        assert len(runtime._tails) == 1, "one follower of its log, however often it is listed"
    finally:
        await runtime.stop(backend, timeout=0.1)
        await runtime.close()
