"""The daemons under test: `python -m watcher run` subprocesses (tests/harness' DaemonProcess)
and their JSON log events, merged into one log."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import ROOT
from harness.daemon import DaemonProcess
from harness.proc import rss_mb


class EventLog:
    """Every daemon's log events, as (instance number, record, wall clock of the line)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def add(self, instance: int, record: dict[str, Any]) -> None:
        with self._lock:
            self.records.append((instance, record))

    def __len__(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> list[dict[str, Any]]:
        with self._lock:
            return [r for _n, r in self.records[mark:]]

    def named(self, *names: str) -> list[tuple[int, dict[str, Any], float]]:
        with self._lock:
            return [(n, r, _wall(r)) for n, r in self.records if r.get("event") in names]


def _wall(record: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(record["time"]).timestamp()
    except (KeyError, ValueError):
        return 0.0


class Instance:
    """One `python -m watcher run`: its output copied to a log file, its events added to the
    shared EventLog (all but ``intake.swept``); started, not waited for."""

    def __init__(
        self,
        number: int,
        role: str,
        env: dict[str, str],
        log: EventLog,
        logs: Path,
        on_ready: Callable[[Instance], None],
    ) -> None:
        self.number, self.role, self._on_ready = number, role, on_ready
        self.expected_exit = False
        self.rss: list[tuple[float, float]] = []  # (wall clock, MB)
        self._log = log
        self.started = time.time()
        self.ended = 0.0  # wall clock of our kill or terminate
        self.daemon = DaemonProcess(
            env,
            keep=lambda record: False,  # the EventLog has them all
            on_record=self._record,
            log_file=logs / f"daemon-{number:02}-{role}.jsonl",
            cwd=ROOT,
        )
        self.daemon.start(wait_ready=False)
        self.ready = self.daemon.ready
        assert self.daemon.proc is not None
        self.proc: subprocess.Popen[bytes] = self.daemon.proc

    def _record(self, record: dict[str, Any]) -> None:
        if record.get("event") == "watcher.ready":
            self._on_ready(self)
        if record.get("event") != "intake.swept":
            self._log.add(self.number, record)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.expected_exit = True
        self.ended = time.time()
        self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60.0) -> int | None:
        self.expected_exit = True
        self.ended = time.time()
        try:
            return self.daemon.terminate(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            return None

    def sample_rss(self) -> None:
        try:
            mb = rss_mb(self.proc.pid)
        except OSError:
            return
        if mb:  # 0.0: exited, not yet reaped
            self.rss.append((time.time(), mb))
