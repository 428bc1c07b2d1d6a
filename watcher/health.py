"""Liveness, readiness, and the heartbeat that `watcher healthcheck` reads.

- liveness (/healthz): the daemon's loops (observer, settle, sweep, workers) are running.
- readiness (/readyz): clamd answers PING and answered its canaries right (watcher/canaries.py),
  definitions are not stale, the uploads, processed and quarantine directories are writable,
  and no destination refuses deliveries. A failed PING also tells the daemon clamd is down, so
  workers pause and `clamd.down` is logged even while no file arrives.
- the heartbeat: ``<state_dir>/heartbeat.json``, rewritten every `heartbeat_interval_s`
  while the loops are alive, naming the clamd to PING and what else makes the daemon
  unhealthy (a destination refusing deliveries, clamd failing its canaries); `watcher healthcheck`
  (watcher/healthcheck.py) reads it, so it needs neither HTTP nor the settings model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher.clamav import ClamdScanner, Scanner
from watcher.errors import ClamdUnavailable
from watcher.fsops import write_json_atomic

if TYPE_CHECKING:
    from watcher.daemon import Daemon


def quick_ping(scanner: Scanner, timeout_s: float) -> str | None:
    """PING with a short connect and reply timeout; None when clamd answered, else why not."""
    try:
        if isinstance(scanner, ClamdScanner):
            dataclasses.replace(scanner, connect_timeout_s=timeout_s).ping(timeout=timeout_s)
        else:
            scanner.ping()
    except ClamdUnavailable as err:
        return str(err)
    return None


def probe_clamd(daemon: Daemon) -> str | None:
    """Why clamd is not usable right now, or None. Marks it down when a PING fails."""
    if not daemon.settings.scanning_enabled:
        return None
    if not daemon.clamd.up.is_set():
        return "clamd is down: files wait until it answers PING again"
    problem = quick_ping(daemon.scanner, daemon.settings.probe_timeout_s)
    if problem is not None:
        daemon.clamd.mark_down(problem)
    return problem


def liveness(daemon: Daemon) -> tuple[bool, dict[str, Any]]:
    alive = daemon.alive()
    return alive, {"alive": alive, "intake_alive": daemon.intake.alive()}


def readiness(daemon: Daemon) -> tuple[bool, dict[str, Any]]:
    """Every check by name, ``"ok"`` or the reason it fails; `failing` lists the failures."""
    s = daemon.settings
    checks: dict[str, str | None] = {
        "daemon": None if daemon.alive() else "a daemon loop has stopped (see /healthz)",
        "clamd": probe_clamd(daemon),
        "clamd_canaries": daemon.clamd_check.problem,
        "definitions": "definitions are stale" if daemon.definitions.stale else None,
        "uploads_dir": writable(s.uploads_dir),
        "processed_dir": writable(s.processed_dir),
        "quarantine_dir": writable(s.quarantine_dir),
        "delivery": delivery_problem(daemon.destinations.failing()),
    }
    failing = [name for name, problem in checks.items() if problem is not None]
    body = {
        "ready": not failing,
        "failing": failing,
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    return not failing, body


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


class Heartbeat:
    """Touches `path` every `interval_s` while `alive()`; removed at a graceful stop."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        alive: Callable[[], bool],
        problems: Callable[[], dict[str, str]] = dict,
        **info: Any,
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self._alive = alive
        self._problems = problems  # what makes the daemon unhealthy though its loops run
        self._info = info  # what `watcher healthcheck` needs: the clamd address, the timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="watcher-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def beat(self) -> None:
        body = {
            "pid": os.getpid(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "interval_s": self.interval_s,
            "problems": self._problems(),
            **self._info,
        }
        write_json_atomic(self.path, json.dumps(body).encode(), mode=0o644)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._alive():
                # A full state disk: the heartbeat goes stale and healthcheck says so.
                with contextlib.suppress(OSError):
                    self.beat()
