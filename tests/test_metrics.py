"""/metrics: Prometheus text that counts files by verdict and reads the daemon's state."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from harness import EICAR
from harness.events import Events
from harness.http_client import get
from watcher.ops.metrics import oldest_pending_s
from watcher.service import Service

Start = Callable[..., Service]


def scrape(daemon: Service) -> Samples:
    response = get(daemon, "/metrics")
    assert response.status == 200 and response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_files_are_counted_by_verdict_with_scan_durations(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    daemon = start_daemon()
    before = scrape(daemon)
    assert value(before, "watcher_files_total", verdict="clean") == 0
    assert value(before, "watcher_files_total", verdict="infected") == 0
    (dirs["uploads"] / "fine.txt").write_bytes(b"fine")
    (dirs["uploads"] / "bad.com").write_bytes(EICAR)
    assert get(daemon, "/v1/files/fine.txt?wait=20").json()["state"] == "clean"
    assert get(daemon, "/v1/files/bad.com?wait=20").json()["state"] == "infected"

    after = scrape(daemon)
    assert value(after, "watcher_files_total", verdict="clean") == 1
    assert value(after, "watcher_files_total", verdict="infected") == 1
    assert value(after, "watcher_files_total", verdict="unscannable") == 0
    assert value(after, "watcher_scan_duration_seconds_count") == 2
    assert value(after, "watcher_quarantine_files") == 1
    assert value(after, "watcher_quarantine_bytes") == len(EICAR)
    assert value(after, "watcher_clamd_up") == 1
    assert value(after, "watcher_queue_depth") == 0
    assert value(after, "watcher_oldest_pending_seconds") == 0
    assert value(after, "watcher_events_total", event="file.infected", level="WARNING") == 1


def test_job_success_hook_and_definitions_state_are_exported(start_daemon: Start) -> None:
    daemon = start_daemon()
    when = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    daemon.jobs.status.record_success("update", when)
    daemon.daemon.definitions.set_stale(True)
    samples = scrape(daemon)
    assert value(samples, "watcher_job_last_success_timestamp_seconds", job="update") == (
        when.timestamp()
    )
    assert value(samples, "watcher_definitions_stale") == 1


def test_a_file_still_being_written_counts_as_pending(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    target = dirs["uploads"] / "slow.bin"
    with open(target, "wb") as f:  # open for writing: the daemon leaves it alone
        f.write(b"part")
        f.flush()
        assert (value(scrape(daemon), "watcher_oldest_pending_seconds") or 0) > 0
        later = time.time() + 100  # time passed in: the same file, 100 s on
        staging = daemon.settings.staging_root
        assert 99 < oldest_pending_s(daemon.daemon.intake.walk(), staging, later) < 102
        assert oldest_pending_s([], staging, later) == 0
