"""Whether the verdict store takes writes now: one outage, one pair of log lines.

A store marks each operation's outcome: `failed(reason)` when it raised StoreUnavailable,
`succeeded()` when one went through. The first failure logs `store.unavailable` (the files'
claims wait from then on, watcher/recording.py), the first success after it `store.available`
with how long it lasted; readiness (`/readyz`'s `verdict_store`) and the metric
`watcher_verdict_store_up` read `problem()`.
"""

from __future__ import annotations

import threading
import time

from watcher.logs import emit


class StoreHealth:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic
        self._reason: str | None = None

    def failed(self, reason: str) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._reason = reason
        if first:
            emit("store.unavailable", backend=self.backend, reason=reason)

    def succeeded(self) -> None:
        with self._lock:
            since, self._down_since, self._reason = self._down_since, None, None
        if since is not None:
            down_s = round(time.monotonic() - since, 3)
            emit("store.available", backend=self.backend, down_s=down_s)

    def problem(self) -> str | None:
        """None while the store answers; else why its last operation failed."""
        with self._lock:
            return None if self._down_since is None else self._reason
