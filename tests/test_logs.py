"""The log as operators read it: one flat JSON object per line, uploaders' names as data, and a
budget so a flood of one event cannot drown the others."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from loguru import logger

from harness import ROOT
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


# Renders the same events through emit (its direct line) and through loguru's record (the way
# lines with an exception and other libraries' logs go), in a process of its own: configuring
# the log replaces loguru's sinks, the tests' included.
_BOTH_WAYS = """
import sys
from watcher.logs import _log, configure_logging, emit
configure_logging("json", "INFO", sys.stdout)
fields = {"path": "{0} {evil}\\u00e9.txt", "dest": "/p/x", "size": 3, "sha256": "ab", "n": None}
emit("file.clean", **fields)
_log("file.clean", "INFO", "clean", None, fields)
emit("definitions.canary_unwritable", path="below the level")
try:
    raise ValueError("boom")
except ValueError:
    emit("file.error", path="e", reason="r", exception=True)
"""


def test_a_direct_event_line_is_the_line_loguru_renders_field_for_field() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BOTH_WAYS],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    direct, through_loguru, error = (json.loads(line) for line in done.stdout.splitlines())
    iso_ms = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
    assert iso_ms.fullmatch(direct.pop("time")) and iso_ms.fullmatch(through_loguru.pop("time"))
    assert list(direct.items()) == list(through_loguru.items())  # same fields, same order
    assert direct["path"] == "{0} {evil}\u00e9.txt" and direct["level"] == "INFO"
    assert error["event"] == "file.error" and "ValueError: boom" in error["exception"]
