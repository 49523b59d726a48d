"""The model directory as one caller sees it: only the models its credentials allow, its waits measured."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from common import notes
from common.directory import ALLOW_MODEL_KEY, Allowed, Lease, ModelDirectory, ModelInfo


class Restricted:
    """The directory as one caller sees it: only the models its credentials allow."""

    def __init__(self, inner: ModelDirectory, allowed: Allowed | None) -> None:
        self._inner = inner
        self._allowed = allowed

    @classmethod
    def for_scope(cls, inner: ModelDirectory, scope: MutableMapping[str, Any]) -> Restricted:
        return cls(inner, scope.get(ALLOW_MODEL_KEY))

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        num_predict: int | None = None,
    ) -> AsyncIterator[Lease]:
        began = time.perf_counter()
        held = self._inner.lease(
            name,
            keep_alive=keep_alive,
            embeddings=embeddings,
            ctx_size=ctx_size,
            num_predict=num_predict,
            allowed=self._allowed,
        )
        async with held as lease:
            notes.note_wait(time.perf_counter() - began)  # loading, queueing: the model's time, not ours
            yield lease

    async def unload(self, name: str) -> None:
        await self._inner.unload(name, self._allowed)

    async def models(self) -> Sequence[ModelInfo]:
        return await self._inner.models(self._allowed)

    async def model(self, name: str) -> ModelInfo:
        return await self._inner.model(name, self._allowed)
