"""When each scheduled job last succeeded (or failed): written by the jobs, read by /metrics.

The seam between the scheduler and the operations surface::

    daemon.job_status.record_success("update", datetime.now(UTC))
    daemon.job_status.record_failure("update", datetime.now(UTC))

Exported as ``watcher_job_last_success_timestamp_seconds{job="update"}`` (and
``..._last_failure_...``). The alert rules in docs/alerting/ use the job name ``update`` for
the definition updates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class JobRun:
    last_success: datetime | None = None
    last_failure: datetime | None = None


class JobStatus:
    """Thread-safe: jobs write from the scheduler's threads, scrapes read from HTTP threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRun] = {}

    def record_success(self, name: str, when: datetime) -> None:
        with self._lock:
            previous = self._jobs.get(name, JobRun())
            self._jobs[name] = JobRun(when, previous.last_failure)

    def record_failure(self, name: str, when: datetime) -> None:
        with self._lock:
            previous = self._jobs.get(name, JobRun())
            self._jobs[name] = JobRun(previous.last_success, when)

    def snapshot(self) -> dict[str, JobRun]:
        with self._lock:
            return dict(self._jobs)
