"""What a new token may be given: numbers that are finite and bounded, models within its maker's."""

from __future__ import annotations

import math

import pytest

from common.errors import BadRequest
from controller.auth.bounds import MAX_EXPIRY_SECONDS, expiry_seconds, glob_within, parse_rpm
from controller.auth.identity import Identity


@pytest.mark.parametrize(
    ("glob", "makers", "within"),
    [
        ("gemma3*", ("gemma3*",), True),
        ("GEMMA3*", ("gemma3*",), True),
        ("gemma3:1b*", ("gemma3*",), True),
        ("gemma3?", ("gemma3*",), True),
        ("gemma3", ("gemma3*",), True),
        ("gemma3:270m", ("gemma3*",), True),
        ("x:latest", ("x",), True),
        ("x", ("x:latest",), True),
        ("gemma*", ("gemma3*",), False),
        ("*", ("gemma3*",), False),
        ("gemma3*", ("gemma3:1b*",), False),
        ("a*", ("a",), False),
        ("?emma3", ("gemma3*",), False),
        ("llama3", ("gemma3*",), False),
        ("x:7b", ("x",), False),
        ("gemma3*", ("gemma3?*",), False),  # sound, not complete: a maker glob with two wildcards only matches itself
    ],
)
def test_glob_within_is_sound(glob: str, makers: tuple[str, ...], within: bool) -> None:
    assert glob_within(glob, makers) is within


@pytest.mark.parametrize("name", ["gemma3", "gemma3:latest", "gemma3:1b", "gemma3:1b-it", "gemma3x", "Gemma3:1B"])
def test_a_glob_within_allows_no_model_its_maker_does_not(name: str) -> None:
    makers = ("gemma3*",)
    for glob in ("gemma3:1b*", "gemma3?", "gemma3", "gemma3:1b"):
        assert glob_within(glob, makers)
        if Identity("u", "token", frozenset(), (glob,)).allows_model(name):
            assert Identity("u", "token", frozenset(), makers).allows_model(name), (glob, name)


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, 1e400, 10**400, 0, -1, 0.0, True, MAX_EXPIRY_SECONDS + 1, "0d", [1]]
)
def test_expiry_must_be_finite_positive_and_bounded(value: object) -> None:
    with pytest.raises(BadRequest):
        expiry_seconds(value)


def test_expiry_accepts_text_and_seconds() -> None:
    assert expiry_seconds("30d") == 30 * 86400
    assert expiry_seconds(90) == 90.0
    assert expiry_seconds(1.5) == 1.5
    assert expiry_seconds(None) is None and expiry_seconds("never") is None


@pytest.mark.parametrize("text", ["²", "٣", "1.5", "-1", "0", "9" * 400, "1e3"])
def test_form_rpm_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_rpm(text)


def test_form_rpm() -> None:
    assert parse_rpm(" 30 ") == 30 and parse_rpm("") is None
