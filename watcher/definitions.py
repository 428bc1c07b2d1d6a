"""What clamd has loaded, and how old it is. Shared by the update jobs, health and metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class LoadedDefinitions:
    """Parsed from clamd's VERSION: ``ClamAV 1.4.6/27100/Thu Nov 26 09:27:32 2026``."""

    engine: str
    version: int | None  # the daily database's version; None for custom-only sets
    built_at: datetime | None

    @classmethod
    def parse(cls, reply: str) -> LoadedDefinitions:
        engine, _, rest = reply.partition("/")
        number, _, date = rest.partition("/")
        built_at = None
        if date:
            try:
                built_at = datetime.strptime(date.strip(), "%a %b %d %H:%M:%S %Y").replace(
                    tzinfo=UTC
                )
            except ValueError:
                built_at = None
        return cls(engine.strip(), int(number) if number.isdigit() else None, built_at)

    @property
    def official(self) -> bool:
        return self.version is not None

    def age_s(self, now: datetime) -> float | None:
        return None if self.built_at is None else (now - self.built_at).total_seconds()


class DefinitionsState:
    """The latest known definitions; written by jobs, read by health checks (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: LoadedDefinitions | None = None
        self._stale = False

    def update(self, loaded: LoadedDefinitions) -> None:
        with self._lock:
            self._loaded = loaded

    def set_stale(self, stale: bool) -> None:
        with self._lock:
            self._stale = stale

    @property
    def loaded(self) -> LoadedDefinitions | None:
        with self._lock:
            return self._loaded

    @property
    def stale(self) -> bool:
        with self._lock:
            return self._stale
