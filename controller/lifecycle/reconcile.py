"""What runs against what the books say: the pure comparison behind every reconcile pass.

The lifecycle is level-triggered: instead of trusting that every event (an exit, a stop) arrived and every call
succeeded, a pass lists what the runtime runs for this instance and compares it with the books — each model's
backend — at start-up, on a slow timer (``runtime.reconcile_interval``) and after the runtime's event watch was
lost and is back. The supervisor acts on the difference (supervisor.py ``reconcile``):

- *unknown*: left by a previous controller (or met again after an outage) and in nobody's books: adopted or
  removed, by the start-up rules — one code path for start-up adoption and for every later pass;
- *strays*: started by this controller yet in nobody's books, in two passes in a row (one pass may meet a backend
  between its start and its owner recording it): removed;
- *missing*: in the books before and after the listing, yet not listed: taken for dead, as after a crash.

How a pass fits with each model's owner task: controller/lifecycle/design.md ("Reconciliation and adoption").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from controller.runtime.base import Backend


@dataclass(frozen=True)
class Difference:
    unknown: tuple[Backend, ...] = ()
    strays: tuple[Backend, ...] = ()
    missing: tuple[Backend, ...] = ()
    suspects: frozenset[str] = frozenset()  # handles of unbooked own backends: strays if met so again next pass


def compare(
    booked_before: Mapping[str, Backend],
    booked_after: Mapping[str, Backend],
    listed: Sequence[Backend],
    suspects: Collection[str] = frozenset(),
) -> Difference:
    """The difference between the books (by handle, taken just before and just after the listing, so that a
    backend started or stopped while the runtime listed is neither missing nor unknown) and the listing."""
    listed_handles = {backend.handle for backend in listed}
    unbooked = [backend for backend in listed if backend.handle not in booked_after]
    own = {backend.handle for backend in unbooked if not backend.adopted}
    return Difference(
        unknown=tuple(backend for backend in unbooked if backend.adopted),
        strays=tuple(backend for backend in unbooked if backend.handle in own and backend.handle in suspects),
        missing=tuple(
            backend
            for handle, backend in booked_after.items()
            if handle in booked_before and handle not in listed_handles
        ),
        suspects=frozenset(own),
    )
