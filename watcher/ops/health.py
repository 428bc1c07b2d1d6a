"""Liveness (/healthz) and readiness (/readyz), from the daemon's state.

- liveness: the daemon's loops (observer, settle, sweep, workers, committer) are running.
- readiness: clamd answers PING and answered its canaries right (watcher/canaries.py; with a
  pool of endpoints, at least one does, and the body lists each endpoint's state),
  definitions are not stale, the uploads, processed and quarantine directories are writable,
  no destination refuses deliveries, and the verdict store takes writes (a database that is
  down: files are still delivered, their records wait). A failed PING also tells the daemon
  clamd is down, so workers pause and `clamd.down` is logged even while no file arrives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from watcher.ops.state import DaemonState
from watcher.settings import Settings
from watcher.store import VerdictStore


def liveness(daemon: DaemonState) -> tuple[bool, dict[str, Any]]:
    alive = daemon.alive()
    return alive, {"alive": alive, "intake_alive": daemon.intake_alive()}


def readiness(
    daemon: DaemonState, s: Settings, store: VerdictStore | None = None
) -> tuple[bool, dict[str, Any]]:
    """Every check by name, ``"ok"`` or the reason it fails; `failing` lists the failures."""
    checks: dict[str, str | None] = {
        "daemon": None if daemon.alive() else "a daemon loop has stopped (see /healthz)",
        "clamd": daemon.probe_clamd(s.probe_timeout_s),
        "clamd_canaries": daemon.clamd_distrust(),
        "definitions": "definitions are stale" if daemon.definitions.stale else None,
        "uploads_dir": writable(s.uploads_dir),
        "processed_dir": writable(s.processed_dir),
        "quarantine_dir": writable(s.quarantine_dir),
        "delivery": delivery_problem(daemon.failing_destinations()),
        "verdict_store": store_problem(store),
    }
    failing = [name for name, problem in checks.items() if problem is not None]
    body: dict[str, Any] = {
        "ready": not failing,
        "failing": failing,
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    endpoints = daemon.clamd_endpoints()
    if endpoints:  # a pool: ready while one endpoint is; each one's state, for people
        body["clamd_endpoints"] = {
            e.endpoint: e.state + (f": {e.problem}" if e.problem else "") for e in endpoints
        }
    return not failing, body


def store_problem(store: VerdictStore | None) -> str | None:
    problem = store.problem() if store is not None else None
    return None if problem is None else f"the verdict store is unavailable: {problem}"


def delivery_problem(failing: dict[str, str]) -> str | None:
    """One line naming each destination that refuses deliveries, or None."""
    if not failing:
        return None
    return "; ".join(f"deliveries to {dest} fail: {reason}" for dest, reason in failing.items())


def writable(directory: Path) -> str | None:
    try:
        if not directory.is_dir():
            return f"{directory} is not a directory"
        if not os.access(directory, os.W_OK):
            return f"{directory} is not writable"
        vfs = os.statvfs(directory)
    except OSError as err:
        return f"{directory}: {err.strerror}"
    if vfs.f_flag & os.ST_RDONLY:
        return f"{directory} is on a read-only filesystem"
    if vfs.f_bavail == 0:
        return f"{directory}: no space left"
    return None
