"""The daemons under test: `python -m watcher run` subprocesses and their JSON log events."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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
    """One `python -m watcher run`: its stdout copied to a log file and parsed into events."""

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
        self.ready = threading.Event()
        self.expected_exit = False
        self.rss: list[tuple[float, float]] = []  # (wall clock, MB)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.started = time.time()
        self.ended = 0.0  # wall clock of our kill or terminate
        self._log, self._file = log, logs / f"daemon-{number:02}-{role}.jsonl"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self._file, "wb") as out:
            for line in self.proc.stdout:
                out.write(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"event": "raw", "line": line.decode("utf-8", "replace")}
                if record.get("event") == "watcher.ready":
                    self.ready.set()
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
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            return None

    def sample_rss(self) -> None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                self.rss.append((time.time(), int(line.split()[1]) / 1024))
