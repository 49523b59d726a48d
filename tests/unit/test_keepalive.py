from __future__ import annotations

import pytest

from common.durations import FOREVER, DurationError, parse_go_duration, parse_keep_alive


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (30, 30.0), (2.5, 2.5), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("0", 0.0), ("1.5h", 5400.0)],
)
def test_keepalive_parses_like_ollama(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [-1, -0.5, "-1m", "-5m"])
def test_keepalive_negative_means_forever(value: object) -> None:
    assert parse_keep_alive(value) == FOREVER


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("3600", 'time: missing unit in duration "3600"'),
        ("5 minutes", 'time: invalid duration "5 minutes"'),
        ("", 'time: invalid duration ""'),
    ],
)
def test_keepalive_rejects_strings_without_units_with_go_message(value: str, message: str) -> None:
    with pytest.raises(DurationError) as caught:
        parse_keep_alive(value)
    assert str(caught.value) == message


@pytest.mark.parametrize("value", [True, None, [], {}, float("nan")])
def test_keepalive_rejects_other_types(value: object) -> None:
    with pytest.raises(DurationError):
        parse_keep_alive(value)


def test_keepalive_long_strings_are_cut_in_messages() -> None:
    with pytest.raises(DurationError) as caught:
        parse_go_duration("9" * 1000)
    assert len(str(caught.value)) < 120
