"""Which loaded models to stop so that a target model fits: a pure function, no I/O, no clock.

Rules (DESIGN §4):
- ``max_loaded_models`` bounds how many backends exist at once (starting and stopping ones count).
- An optional memory budget per GPU bounds the sum of the estimates of the models on that GPU.
- Pinned models are never chosen. Exclusive loads (a switch) choose every other unpinned model.
- Idle models go first, least recently used first; busy models only when idle ones do not suffice,
  and the caller then waits for them to drain before stopping them (never cut off a request).
- A model admitted for requests it has not served yet ("settling") is never chosen: the caller waits
  until it has served one (``Wait``). Without this, models contending for too few slots evicted each
  other before any of them ran a request, forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Loaded:
    """A model holding a slot, as the policy sees it."""

    name: str
    pinned: bool = False
    in_flight: int = 0
    last_used: float = 0.0  # any monotonic number: only the order matters
    memory: int = 0  # estimated bytes
    gpus: tuple[str, ...] = ()
    settling: bool = False  # admitted for waiting requests, none served yet: not to be stopped now


@dataclass(frozen=True)
class Target:
    name: str
    memory: int = 0
    gpus: tuple[str, ...] = ()
    exclusive: bool = False


@dataclass(frozen=True)
class Limits:
    max_loaded_models: int = 1
    gpu_memory: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Evict:
    """Stop these (in order; busy ones after they drain), then start the target."""

    victims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Only models that have not yet served the requests they were admitted for could make room: ask
    again once one of them has (or has stopped)."""

    settling: tuple[str, ...]


@dataclass(frozen=True)
class Refuse:
    """The target cannot fit whatever is stopped; ``reason`` is shown to the caller."""

    reason: str


def _eviction_order(candidates: Sequence[Loaded]) -> list[Loaded]:
    return sorted(candidates, key=lambda m: (m.in_flight > 0, m.last_used, m.name))


def _memory_victims(
    target: Target, remaining: list[Loaded], order: list[Loaded], budgets: Mapping[str, int]
) -> list[Loaded] | Refuse:
    chosen: list[Loaded] = []
    for gpu in target.gpus:
        budget = budgets.get(gpu)
        if budget is None:
            continue
        if target.memory > budget:
            return Refuse(
                f"model '{target.name}' needs about {target.memory} bytes but GPU {gpu} has a budget of {budget}"
            )
        on_gpu = [m for m in remaining if gpu in m.gpus and m not in chosen]
        used = sum(m.memory for m in on_gpu)
        for candidate in (m for m in order if m in on_gpu):
            if used + target.memory <= budget:
                break
            chosen.append(candidate)
            used -= candidate.memory
        if used + target.memory > budget:
            return Refuse(f"model '{target.name}' does not fit in GPU {gpu}'s memory budget next to pinned models")
    return chosen


def choose_victims(target: Target, loaded: Sequence[Loaded], limits: Limits) -> Evict | Wait | Refuse:
    """Decide what must stop for ``target`` to start; see the module docstring for the rules."""
    others = [m for m in loaded if m.name != target.name]
    movable = [m for m in others if not m.pinned]
    settling = tuple(m.name for m in movable if m.settling)
    order = _eviction_order([m for m in movable if not m.settling])
    if target.exclusive:
        return Wait(settling) if settling else Evict(tuple(m.name for m in order))

    victims: list[Loaded] = []
    excess = len(others) + 1 - limits.max_loaded_models
    if excess > len(order):
        if excess <= len(movable):
            return Wait(settling)
        pinned = len(others) - len(movable)
        return Refuse(
            f"cannot load '{target.name}': {pinned} pinned model(s) hold all "
            f"{limits.max_loaded_models} slot(s) (scheduling.max_loaded_models)"
        )
    victims.extend(order[: max(excess, 0)])

    remaining = [m for m in others if m not in victims]
    by_memory = _memory_victims(target, remaining, [m for m in order if m not in victims], limits.gpu_memory)
    if isinstance(by_memory, Refuse):
        return Wait(settling) if settling else by_memory
    victims.extend(by_memory)
    # Keep the eviction order overall: idle before busy, least recently used first.
    return Evict(tuple(m.name for m in _eviction_order(victims)))
