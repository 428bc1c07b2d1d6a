"""What the operations surface reads, declared by it: the daemon and the jobs implement these.

The daemon (watcher/daemon.py) imports nothing from here; it offers the methods, and
watcher/service.py hands it over. A test can hand over anything with the same shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from watcher.definitions import DefinitionsState
from watcher.endpoints import EndpointStatus
from watcher.pipeline import Result


class DaemonState(Protocol):
    @property
    def definitions(self) -> DefinitionsState: ...
    @property
    def in_flight(self) -> int: ...
    def alive(self) -> bool: ...
    def intake_alive(self) -> bool: ...
    def queue_depth(self) -> int: ...
    def probe_clamd(self, timeout_s: float) -> str | None:
        """Why clamd cannot scan now (a PING with this timeout), or None."""

    def clamd_distrust(self) -> str | None:
        """Why clamd's answers are not trusted (a canary it answered wrongly), or None."""

    def clamd_endpoints(self) -> list[EndpointStatus]:
        """A pool's clamd endpoints (CLAMAV_HOST over TCP) and their state; none otherwise."""

    def failing_destinations(self) -> dict[str, str]: ...
    def uploads(self) -> Iterator[tuple[Path, os.stat_result]]:
        """What waits in uploads, with its lstat (as intake's sweeps see it)."""

    def add_listener(self, listener: Callable[[Result], None]) -> None: ...
    def on_trust_change(self, listener: Callable[[], None]) -> None: ...


class JobRun(Protocol):
    @property
    def last_success(self) -> datetime | None: ...
    @property
    def last_failure(self) -> datetime | None: ...


class JobRuns(Protocol):
    def snapshot(self) -> Mapping[str, JobRun]: ...
