"""Model states and the only transitions allowed between them.

    stopped ──▶ starting ──▶ ready ──▶ stopping ──▶ stopped
       ▲            │          │           ▲
       │            ▼          ▼           │
       └──────── failed ◀──────┘───────────┘ (stop of a failed model clears it)

``failed`` keeps the error and the last log lines; it is left by a new start (on demand, after the
backoff, or at once for a pinned model) or by an explicit unload.
"""

from __future__ import annotations

from enum import StrEnum

from controller.errors import InvalidTransition


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
