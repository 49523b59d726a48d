"""The catalog: models from config plus every ``*.gguf`` found in ``models_dir``, with GGUF metadata.

Configured models keep their configured names; a discovered file gets a name derived from its file
name (``gemma-3-270m-q4_k_m.gguf`` → ``gemma-3-270m:q4_k_m``) unless a configured model already
points at it. Files that are not GGUF stay in the catalog with an ``error`` so the operator sees
why, and loading them is refused with a clear 400. Metadata is cached by (path, size, mtime).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import InvalidModelFile, InvalidModelName, ModelNotFound
from common.names import canonical, name_from_filename, validate_model_name
from controller.catalog.gguf_meta import GgufMetadata, read_gguf_metadata
from controller.config import Config, ModelConfig

log = logging.getLogger(__name__)

_DISCOVERY_DEPTH = 2  # models_dir/*.gguf and models_dir/<folder>/*.gguf
_RESCAN_INTERVAL = 1.0  # an unknown name triggers at most one disk scan per second
_RESOLVED_CACHE = 1024  # distinct spellings remembered (bounded: names come from clients)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: Path
    aliases: tuple[str, ...]
    source: Literal["config", "discovered"]
    config: ModelConfig | None
    size: int
    mtime_ns: int
    metadata: GgufMetadata | None
    error: str | None

    @property
    def key(self) -> str:
        return canonical(self.name)

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.mtime_ns}"

    @property
    def digest(self) -> str:
        """A stable identifier of this file version (not a content hash: hashing GBs at start is too slow)."""
        return hashlib.sha256(f"{self.path}:{self.fingerprint}".encode()).hexdigest()

    @property
    def modified_at(self) -> float:
        return self.mtime_ns / 1e9

    def require_loadable(self) -> None:
        if self.error:
            raise InvalidModelFile(f"model '{self.name}' cannot be loaded: {self.error}")


def _skip_discovered(path: Path) -> bool:
    """Projector files and the second and later shards of a split model are not models of their own."""
    stem = path.stem.lower()
    if "mmproj" in stem:
        return True
    parts = stem.rsplit("-of-", 1)
    return len(parts) == 2 and parts[0][-5:].isdigit() and not parts[0].endswith("00001")


class Catalog:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._entries: dict[str, CatalogEntry] = {}
        self._aliases: dict[str, str] = {}
        self._resolved: dict[str, CatalogEntry] = {}
        self._metadata_cache: dict[tuple[str, int, int], GgufMetadata | str] = {}
        self._last_scan = 0.0
        self._scan_lock = asyncio.Lock()

    def get(self, key: str) -> CatalogEntry | None:
        """The entry whose canonical name is ``key`` (no alias resolution, no rescan)."""
        return self._entries.get(key)

    def entries(self) -> list[CatalogEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    async def refresh(self) -> list[CatalogEntry]:
        async with self._scan_lock:
            entries = await asyncio.to_thread(self._scan)
            self._entries = {entry.key: entry for entry in entries}
            self._resolved = {}
            self._aliases = {canonical(alias): entry.key for entry in entries for alias in entry.aliases}
            self._last_scan = time.monotonic()
            return self.entries()

    def _find(self, name: str) -> CatalogEntry | None:
        """By name or alias; the spelling → entry map is memoised (names arrive on every request)."""
        entry = self._resolved.get(name)
        if entry is None:
            key = canonical(name)
            entry = self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))
            if entry is not None and len(self._resolved) < _RESOLVED_CACHE:
                self._resolved[name] = entry
        return entry

    async def lookup(self, name: str) -> CatalogEntry:
        """Find a model by name or alias (case-insensitive, ``:latest`` implied); rescan once if unknown."""
        if not isinstance(name, str):
            raise InvalidModelName("model name must be a string")
        entry = self._resolved.get(name)
        if entry is not None:
            return entry  # a spelling seen before: already validated and found
        validate_model_name(name)
        entry = self._find(name)
        if entry is None and time.monotonic() - self._last_scan >= _RESCAN_INTERVAL:
            await self.refresh()
            entry = self._find(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry

    # ------------------------------------------------------------------ blocking part (a thread)

    def _scan(self) -> list[CatalogEntry]:
        entries: list[CatalogEntry] = []
        claimed: set[Path] = set()
        for name, model in self._config.models.items():
            entries.append(self._entry(name, model.path, tuple(model.aliases), "config", model))
            claimed.add(self._real(model.path))
        taken = {canonical(n) for e in entries for n in (e.name, *e.aliases)}
        for path in self._discover():
            if self._real(path) in claimed:
                continue
            try:
                name = name_from_filename(path.stem)
            except InvalidModelName:
                log.warning("skipping %s: no valid model name can be derived from its file name", path)
                continue
            if canonical(name) in taken:
                log.warning("skipping %s: the name %s is already taken", path, name)
                continue
            taken.add(canonical(name))
            entries.append(self._entry(name, path, (), "discovered", None))
        # Forget metadata of files that are gone or changed.
        current = {(str(e.path), e.size, e.mtime_ns) for e in entries}
        self._metadata_cache = {k: v for k, v in self._metadata_cache.items() if k in current}
        return entries

    @staticmethod
    def _real(path: Path) -> Path:
        try:
            return path.resolve()
        except OSError:
            return path

    def _discover(self) -> list[Path]:
        root = self._config.resolved_models_dir
        if not root.is_dir():
            return []
        found: list[Path] = []
        for depth in range(_DISCOVERY_DEPTH):
            pattern = "/".join(["*"] * depth + ["*.gguf"])
            found += [p for p in root.glob(pattern) if p.is_file() and not _skip_discovered(p)]
        return sorted(found)

    def _entry(
        self,
        name: str,
        path: Path,
        aliases: tuple[str, ...],
        source: Literal["config", "discovered"],
        config: ModelConfig | None,
    ) -> CatalogEntry:
        try:
            stat = path.stat()
        except OSError as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else exc.strerror
            return CatalogEntry(name, path, aliases, source, config, 0, 0, None, f"{path}: {reason}")
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        cached = self._metadata_cache.get(key)
        if cached is None:
            try:
                cached = read_gguf_metadata(path)
            except InvalidModelFile as exc:
                cached = exc.message
            self._metadata_cache[key] = cached
        metadata = cached if isinstance(cached, GgufMetadata) else None
        error = cached if isinstance(cached, str) else None
        return CatalogEntry(name, path, aliases, source, config, stat.st_size, stat.st_mtime_ns, metadata, error)
