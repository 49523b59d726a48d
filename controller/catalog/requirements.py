"""What a request needs from a backend, and a model's lifecycle settings (plain values)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirements:
    """What a request needs from the running backend beyond the model itself (load-time flags)."""

    embeddings: bool = False
    ctx_size: int | None = None  # the effective context per request (see ModelProfile.effective)
    ctx_requested: bool = False  # a request asked for it (num_ctx), rather than the config

    def merge(self, other: Requirements) -> Requirements:
        ctx = max(filter(None, (self.ctx_size, other.ctx_size)), default=None)
        return Requirements(
            embeddings=self.embeddings or other.embeddings,
            ctx_size=ctx,
            ctx_requested=self.ctx_requested or other.ctx_requested,
        )

    def satisfied_by(self, running: Requirements) -> bool:
        if self.embeddings and not running.embeddings:
            return False
        return self.ctx_size is None or (running.ctx_size or 0) >= self.ctx_size

    @property
    def weight(self) -> tuple[int, bool]:
        """How much a backend must give: the context (its memory) first, then the embeddings endpoint."""
        return (self.ctx_size or 0, self.embeddings)

    @classmethod
    def merge_all(cls, every: Iterable[Requirements]) -> Requirements:
        merged = cls()
        for one in every:
            merged = merged.merge(one)
        return merged

    def as_labels(self) -> dict[str, str]:
        """Kept with the backend (pid file, container labels) so an adopted one is understood again."""
        return {
            "embeddings": str(int(self.embeddings)),
            "ctx_size": str(self.ctx_size or ""),
            "ctx_requested": str(int(self.ctx_requested)),
        }

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Requirements:
        ctx = labels.get("ctx_size", "")
        return cls(
            embeddings=labels.get("embeddings") == "1",
            ctx_size=int(ctx) if ctx.isdigit() else None,
            ctx_requested=labels.get("ctx_requested") == "1",
        )


@dataclass(frozen=True)
class ModelPolicy:
    """Per-model lifecycle settings resolved from config (model value, else defaults)."""

    keep_alive: float = 300.0
    startup_timeout: float = 120.0
    health_interval: float = 1.0
    stop_timeout: float = 10.0
    max_concurrent: int = 4
    queue_depth: int = 512
    pinned: bool = False
    drain_timeout: float = 300.0  # how long a stop waits for the gateway processes' requests on the backend
    adoption_settle: float = 3.0  # an adopted backend stops no sooner than this after its adoption (see model.py)


NOTHING_SPECIAL = Requirements()  # a plain request: chat or completion with the configured context
