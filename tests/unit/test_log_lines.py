"""The one splitter every runtime's log follower reads a backend's output through."""

from __future__ import annotations

from controller.runtime.logs import MAX_LINE_BYTES, LineSplitter


def test_lines_come_whole_whatever_the_chunks() -> None:
    lines = LineSplitter()
    assert lines.feed(b"first li") == []
    assert lines.feed(b"ne\r\nsecond\nthi") == ["first line", "second"]
    assert lines.feed("rd \xe2\x82".encode("latin-1")) == []
    assert lines.feed(b"\xac\n\xff\n") == ["third \N{EURO SIGN}", "\N{REPLACEMENT CHARACTER}"]
    assert lines.feed(b"no newline at the end") == []
    assert lines.rest() == ["no newline at the end"]
    assert lines.rest() == []


def test_output_without_a_newline_is_cut_into_bounded_lines() -> None:
    lines = LineSplitter()
    out = lines.feed(b"x" * (3 * MAX_LINE_BYTES + 10))
    assert [len(line) for line in out] == [MAX_LINE_BYTES] * 3
    assert lines.rest() == ["x" * 10]
