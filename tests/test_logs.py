"""The log as operators read it: one flat JSON object per line, uploaders' names as data, and a
budget so a flood of one event cannot drown the others."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from harness.daemon import DaemonProcess
from harness.events import loguru_events
from harness.files import write
from watcher.logs import LogBudget


def test_log_budget_passes_ten_lines_a_second_per_event_and_counts_the_rest() -> None:
    events, sink = loguru_events()
    try:
        budget = LogBudget("http.log_suppressed", per_s=10)
        for n in range(25):
            budget.log("http.client_error", now=100.0 + n / 100, n=n)
        budget.log("http.busy", now=100.5)
        budget.flush(now=101.0)  # the second is over: one line sums it up
        budget.log("http.client_error", now=101.1, n=99)
    finally:
        logger.remove(sink)
    assert [e["n"] for e in events.named("http.client_error")] == [*range(10), 99]
    assert len(events.named("http.busy")) == 1
    (summary,) = events.named("http.log_suppressed")
    assert summary["suppressed_event"] == "http.client_error" and summary["count"] == 15


def test_json_log_lines_are_flat_and_carry_names_as_data(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    daemon = DaemonProcess(subprocess_env).start()
    write(dirs["uploads"] / "{0} {evil}.txt", b"braces")
    record = daemon.events.wait_for("file.clean")[0]
    assert daemon.terminate() == 0
    assert record["path"] == "{0} {evil}.txt"
    for line in daemon.lines:
        parsed = json.loads(line)
        assert {"time", "level", "event", "message"} <= parsed.keys()
        assert not any(isinstance(v, dict) for v in parsed.values())
    assert daemon.events.named("watcher.stopping")
