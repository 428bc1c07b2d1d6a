"""Waiting for things to happen: log records (from loguru in-process, or a daemon's JSON lines)
that a test or a bench waits for, and a polled predicate for what logs nothing."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from loguru import logger


def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "") -> Any:
    """Poll a cheap predicate (a stat or a ping) until it holds; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.02)


class Events:
    """Records log events (dicts) and lets a test wait for one.

    `keep` chooses the records kept (default: all); every record is counted by name
    whether kept or not, so a bench can wait for thousands of deliveries cheaply.
    """

    def __init__(self, keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self._keep = keep
        self._cond = threading.Condition()

    def add(self, record: dict[str, Any]) -> None:
        with self._cond:
            self.counts[str(record.get("event"))] += 1
            if self._keep is None or self._keep(record):
                self.records.append(record)
            self._cond.notify_all()

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if _matches(r, name, fields)]

    def count(self, *names: str) -> int:
        """How many records of these names arrived (kept or not)."""
        with self._cond:
            return sum(self.counts[name] for name in names)

    def wait_for(
        self, name: str, count: int = 1, timeout_s: float = 20.0, **fields: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [r for r in self.records if _matches(r, name, fields)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [r.get("event") for r in self.records[-20:]]
                    raise AssertionError(
                        f"no {count}x {name} {fields} within {timeout_s}s; last events: {seen}"
                    )
                self._cond.wait(left)

    def wait_count(self, names: tuple[str, ...], count: int, timeout_s: float) -> None:
        """Until `count` records of these names have arrived; RuntimeError after timeout_s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._count(names) >= count, timeout_s):
                raise RuntimeError(f"only {self._count(names)}/{count} of {names}")

    def _count(self, names: tuple[str, ...]) -> int:
        return sum(self.counts[name] for name in names)


def record_of(line: bytes) -> dict[str, Any]:
    """One line of a daemon's output: its JSON event, or event ``raw`` with the line (there
    must be none: every line watcher writes is one JSON object)."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        return record
    return {"event": "raw", "line": line.decode("utf-8", "replace")}


def _matches(record: dict[str, Any], name: str, fields: dict[str, Any]) -> bool:
    return record.get("event") == name and all(record.get(k) == v for k, v in fields.items())


def loguru_events() -> tuple[Events, int]:
    """Attach a sink that feeds an `Events`; returns it and the sink id to remove."""
    events = Events()

    def sink(message: Any) -> None:
        record = message.record
        flat = {"event": record["extra"].get("event"), "level": record["level"].name}
        flat.update(record["extra"])
        events.add(flat)

    return events, logger.add(sink, level="DEBUG")
