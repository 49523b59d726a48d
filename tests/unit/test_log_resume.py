"""Resuming a pod's log stream (runtime/kubernetes.py): which stamped lines are new (pure)."""

from __future__ import annotations

from controller.runtime.kubernetes import LogResume, stamp_nanos


def test_stamps_of_any_precision_are_read_to_the_nanosecond() -> None:
    assert stamp_nanos("1970-01-01T00:00:01Z") == 10**9
    assert stamp_nanos("1970-01-01T00:00:01.5Z") == 15 * 10**8
    assert stamp_nanos("1970-01-01T00:00:01.000000007Z") == 10**9 + 7
    assert stamp_nanos("not a stamp") is None
    assert stamp_nanos("1970-01-01T00:00:01+01:00") is None


def test_a_resumed_stream_takes_only_lines_it_has_not_taken() -> None:
    resume = LogResume.after(None)
    assert resume.since_time() is None
    first = ["1970-01-01T00:00:01.1Z a", "1970-01-01T00:00:01.2Z b\r", "1970-01-01T00:00:01.2Z c"]
    assert [resume.take(line) for line in first] == ["a", "b", "c"]
    assert resume.since_time() == "1970-01-01T00:00:01Z"  # whole seconds: the stream repeats a little
    resume.restart()
    again = [*first, "1970-01-01T00:00:01.2Z d", "1970-01-01T00:00:02Z e"]
    assert [resume.take(line) for line in again] == [None, None, None, "d", "e"]


def test_an_adopted_pods_lines_up_to_the_log_files_last_write_are_skipped() -> None:
    resume = LogResume.after(1.2)
    lines = ["1970-01-01T00:00:01.1Z a", "1970-01-01T00:00:01.2Z b", "1970-01-01T00:00:01.3Z c", "no stamp"]
    assert [resume.take(line) for line in lines] == [None, None, "c", "no stamp"]
