"""serve's supervisor (llamacontroller/supervise.py): the pieces that need no process tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llamacontroller.supervise import METRICS_PREFIX, ServeSupervisor


def test_the_gateways_metrics_folder_is_in_memory_and_a_dead_supervisors_is_removed() -> None:
    made = ServeSupervisor._metrics_dir()
    parent = made.parent
    dead = parent / f"{METRICS_PREFIX}999999999-left"  # no such pid: a supervisor killed before it could clean up
    live = parent / f"{METRICS_PREFIX}{os.getpid()}-running"
    other = parent / f"{METRICS_PREFIX}not-ours"
    for folder in (dead, live, other):
        folder.mkdir()
    try:
        again = ServeSupervisor._metrics_dir()
        assert not dead.exists(), "a folder whose supervisor is gone is removed"
        assert live.exists() and other.exists() and made.exists(), "one whose supervisor runs is kept"
        assert again.name.startswith(f"{METRICS_PREFIX}{os.getpid()}-") and (again.stat().st_mode & 0o777) == 0o700
        if Path("/dev/shm").is_dir():
            assert parent == Path("/dev/shm"), "in memory: never on the data dir's disk"
        shutil.rmtree(again)
    finally:
        for folder in (made, dead, live, other):
            shutil.rmtree(folder, ignore_errors=True)
