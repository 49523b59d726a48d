"""Labels kept with a running backend after its start (``Runtime.keep_labels``: the keep_alive in force) are read
back by the controller that adopts it. The process runtime here; docker and kubernetes in their tiers."""

from __future__ import annotations

import json
from pathlib import Path

from controller.runtime.base import LaunchSpec, RuntimeSetup
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime


async def test_process_runtime_keeps_labels_in_the_pid_file_for_the_next_controller(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\nsleep 30\n")
    binary.chmod(0o700)
    first = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: str(binary)))
    backend = await first.start(LaunchSpec("a:1b", tmp_path / "a.gguf", labels={"ctx_size": "4096"}))
    second = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: str(binary)))
    try:
        await first.keep_labels(backend, {"keep_alive": "inf"})
        await first.keep_labels(backend, {"other": "1"})
        pid_file = json.loads((tmp_path / "state" / "run" / "a:1b.json").read_text())
        assert pid_file["labels"] == {"ctx_size": "4096", "keep_alive": "inf", "other": "1"}
        [adopted] = await second.list_managed()  # a restarted controller
        assert adopted.adopted and adopted.handle == backend.handle
        assert adopted.labels == {"ctx_size": "4096", "keep_alive": "inf", "other": "1"}
    finally:
        await first.stop(backend, timeout=2)  # its child: the one that can reap it
        await first.close()
        await second.close()
    assert not (tmp_path / "state" / "run" / "a:1b.json").exists()
