"""A gateway's copy of the directory (proxy/remote.py): how answers are applied, without a controller."""

from __future__ import annotations

from typing import Any

from common.directory import BackendRef, DirectoryEntry, LiveState, ModelInfo
from proxy.remote import RemoteDirectory


def entry(draining: bool) -> dict[str, Any]:
    info = ModelInfo(
        name="tiny:latest",
        aliases=(),
        source="config",
        path="/models/tiny.gguf",
        size=1,
        modified_at=0.0,
        digest="d",
        architecture=None,
        parameter_count=None,
        quantization=None,
        context_length=None,
        context_size=2048,
        pinned=False,
        file_error=None,
        live=LiveState(state="ready", backend_url="http://127.0.0.1:9", handle="b1"),
    )
    backend = BackendRef("b1", "http://127.0.0.1:9", "key", ctx_size=2048, draining=draining)
    return DirectoryEntry(info, (backend,)).to_wire()


def answer(revision: int, draining: bool, full: bool = False) -> dict[str, Any]:
    return {"epoch": "e1", "revision": revision, "full": full, "models": [entry(draining)], "removed": []}


async def test_an_answer_older_than_the_copy_is_not_applied() -> None:
    # Two exchanges in flight at once (the long poll, and /api/ps catching up): the older answer may land last.
    directory = RemoteDirectory("http://127.0.0.1:1", "s" * 64)
    directory.apply(answer(9, draining=False, full=True))
    directory.apply(answer(10, draining=True))
    assert directory._serving("tiny:latest", False, None, None) is None
    directory.apply(answer(9, draining=False))  # computed before revision 10, arrived after it
    assert directory._serving("tiny:latest", False, None, None) is None
    assert directory.report_body()["revision"] == 10
    directory.apply(answer(9, draining=False, full=True))  # a stale snapshot likewise
    assert directory._serving("tiny:latest", False, None, None) is None
    directory.apply({**answer(3, draining=False, full=True), "epoch": "e2"})  # another controller's run: taken
    assert directory._serving("tiny:latest", False, None, None) is not None
