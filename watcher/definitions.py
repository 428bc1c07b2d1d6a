"""What clamd has loaded, and how old it is. Shared by the update jobs, health and metrics."""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Written by watcher itself into the database directory (see updates.py); not a definition.
CANARY_NAME = "watcher-canary.ndb"
# freshclam's own bookkeeping: rewritten at every run, so it says nothing about definitions.
_NOT_DEFINITIONS = {CANARY_NAME, "freshclam.dat", "mirrors.dat"}


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
        self._age_s: float | None = None
        self._update_at: datetime | None = None
        self._update_error: str | None = None

    def update(self, loaded: LoadedDefinitions) -> None:
        with self._lock:
            self._loaded = loaded

    def set_age(self, age_s: float | None) -> None:
        with self._lock:
            self._age_s = age_s

    def record_update(self, at: datetime, error: str | None) -> None:
        """The last update attempt: when, and its failure cause (None when it worked)."""
        with self._lock:
            self._update_at, self._update_error = at, error

    @property
    def age_s(self) -> float | None:
        """Age of the loaded definitions at the last staleness check; None if unknown."""
        with self._lock:
            return self._age_s

    @property
    def last_update(self) -> tuple[datetime | None, str | None]:
        with self._lock:
            return self._update_at, self._update_error

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


def database_files(directory: Path) -> list[os.DirEntry[str]]:
    """The definition files clamd loads from `directory` (no subdirectories, no bookkeeping)."""
    try:
        with os.scandir(directory) as entries:
            return [
                e
                for e in entries
                if e.is_file(follow_symlinks=False)
                and not e.name.startswith(".")
                and e.name not in _NOT_DEFINITIONS
            ]
    except OSError:
        return []


def fingerprint(directory: Path) -> frozenset[tuple[str, int, int]]:
    """Names, sizes and mtimes of the definition files: changes whenever freshclam installs one."""
    found = set()
    for entry in database_files(directory):
        st = entry.stat(follow_symlinks=False)
        found.add((entry.name, st.st_size, st.st_mtime_ns))
    return frozenset(found)


def newest_file_time(directory: Path) -> datetime | None:
    """When the newest definition file was written (for sets whose VERSION carries no date)."""
    times = [e.stat(follow_symlinks=False).st_mtime for e in database_files(directory)]
    return datetime.fromtimestamp(max(times), UTC) if times else None


def definitions_age_s(
    loaded: LoadedDefinitions | None, newest_file: datetime | None, now: datetime
) -> float | None:
    """Age from clamd's VERSION date when there is one, else from the files' times."""
    if loaded is not None and loaded.built_at is not None:
        return loaded.age_s(now)
    return None if newest_file is None else (now - newest_file).total_seconds()


class Freshness(enum.StrEnum):
    FRESH = "fresh"
    STALE = "stale"


class StalenessTracker:
    """Turns ages into state changes: one event per change, never one per check.

    >>> t = StalenessTracker(max_age_s=100)
    >>> t.observe(50), t.observe(150), t.observe(160), t.observe(10)
    (None, <Freshness.STALE: 'stale'>, None, <Freshness.FRESH: 'fresh'>)
    """

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.state = Freshness.FRESH

    def observe(self, age_s: float | None) -> Freshness | None:
        """The new state if it changed; an unknown age changes nothing."""
        if age_s is None:
            return None
        state = Freshness.STALE if age_s > self.max_age_s else Freshness.FRESH
        if state is self.state:
            return None
        self.state = state
        return state
