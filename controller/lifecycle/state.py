"""Model states, the goals callers set, and the only transitions allowed between states (design.md).

    stopped ──▶ starting ──▶ ready ──▶ stopping ──▶ stopped
       ▲            │          │           ▲
       │            ▼          ▼           │
       └──────── failed ◀──────┘───────────┘ (stop of a failed model clears it)

``failed`` keeps the error and the last log lines; it is left by a new start (on demand, after the
backoff, or at once for a pinned model) or by an explicit unload.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from common.errors import InvalidTransition, LlamaControllerError

MAX_BACKOFF = 30.0


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
}

# States in which a backend process may exist and so a slot (max_loaded_models) is taken.
OCCUPYING = frozenset({State.STARTING, State.READY, State.STOPPING})


def check_transition(old: State, new: State) -> None:
    """Raise InvalidTransition unless ``old → new`` is in the table above."""
    if new not in ALLOWED[old]:
        raise InvalidTransition(f"illegal model state transition {old} → {new}")


class Goal(StrEnum):
    """What callers want of a model; its owner task makes the state follow (design.md)."""

    IDLE = "idle"
    RUN = "run"
    STOP = "stop"
    CLOSE = "close"


E = TypeVar("E", bound=LlamaControllerError)


def fresh(error: E) -> E:
    """A new instance of ``error``: same class, message and attributes, no traceback, cause or context.

    One error is handed to many requests (every waiter of a failed start, every request refused during the
    backoff). Raising one exception object again adds the frames of each raise to its traceback, and with
    them everything those frames referenced: 300 refusals held 31 MB until the model recovered."""
    copy = type(error).__new__(type(error), *error.args)  # not __init__: subclasses take other arguments
    copy.__dict__.update(error.__dict__)
    return copy


def backoff_delay(failures: int) -> float:
    """Seconds before the next start after ``failures`` consecutive failures: 0, 0, 1, 2, 4, ... 30."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 2), MAX_BACKOFF)
