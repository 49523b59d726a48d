from __future__ import annotations

import pytest

from common.errors import InvalidTransition
from controller.lifecycle.state import ALLOWED, State, check_transition


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STOPPED, State.STARTING),
        (State.STARTING, State.READY),
        (State.STARTING, State.FAILED),
        (State.READY, State.STOPPING),
        (State.READY, State.FAILED),
        (State.STOPPING, State.STOPPED),
        (State.FAILED, State.STARTING),
        (State.FAILED, State.STOPPED),
    ],
)
def test_state_allowed_transitions(old: State, new: State) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STOPPED, State.READY),
        (State.READY, State.STARTING),
        (State.STOPPED, State.STOPPING),
        (State.READY, State.READY),
        (State.FAILED, State.READY),
    ],
)
def test_state_illegal_transitions_raise(old: State, new: State) -> None:
    with pytest.raises(InvalidTransition, match=f"{old} → {new}"):
        check_transition(old, new)


def test_state_table_covers_every_state() -> None:
    assert set(ALLOWED) == set(State)
