"""Prometheus metrics, on a registry of the daemon's own (never prometheus-client's global one).

Counters and the histogram are fed by a daemon listener (every final result) and by a loguru
sink that counts log events by name, so an alert can use any event (`file.infected_late`,
`definitions.update_failed`, `job.failed`) without a metric of its own. Gauges are read from
the daemon when scraped.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from watcher.claims import claimed_files
from watcher.endpoints import STATES, EndpointStatus
from watcher.events import alerted
from watcher.logs import observe_events
from watcher.ops.state import DaemonState, JobRuns
from watcher.pipeline import Result
from watcher.settings import Settings
from watcher.store import VerdictStore
from watcher.verdict import CAUSES, VERDICT_WORDS

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(
        self,
        settings: Settings,
        daemon: DaemonState,
        job_runs: JobRuns,
        store: VerdictStore | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.files = Counter(
            "watcher_files", "Files by final verdict.", ["verdict"], registry=self.registry
        )
        # Children bound once: `labels()` takes a lock and builds a key on every call.
        self._files_by_verdict = {verdict: self.files.labels(verdict) for verdict in VERDICT_WORDS}
        self.unscannable = Counter(
            "watcher_unscannable",
            "Unscannable files (quarantined or held) by cause.",
            ["cause"],
            registry=self.registry,
        )
        self._unscannable_by_cause = {cause: self.unscannable.labels(cause) for cause in CAUSES}
        self.scan_duration = Histogram(
            "watcher_scan_duration_seconds",
            "Time from claim to delivery of a scanned file (scan, checks, move).",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "watcher_events",
            "Log events by event name and level.",
            ["event", "level"],
            registry=self.registry,
        )
        for event, level in alerted():  # at 0 from the start: see watcher/events.py
            self.events.labels(event, level)
        self.registry.register(_DaemonCollector(settings, daemon, job_runs, store))
        self._event_counters: dict[tuple[str, str], Any] = {}
        self._stop_observing: Callable[[], None] | None = None

    def start(self) -> None:
        self._stop_observing = observe_events(self._count_event)

    def stop(self) -> None:
        if self._stop_observing is not None:
            self._stop_observing()
            self._stop_observing = None

    def observe(self, result: Result) -> None:
        """Daemon listener: one final result."""
        word = result.outcome.verdict_word
        if word is None or result.fields.get("repeat"):
            return
        (self._files_by_verdict.get(word) or self.files.labels(word)).inc()
        if result.cause is not None:
            cause = result.cause
            (self._unscannable_by_cause.get(cause) or self.unscannable.labels(cause)).inc()
        if result.outcome.scanned:
            self.scan_duration.observe(result.duration_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _count_event(self, event: str, level: str) -> None:
        counter = self._event_counters.get((event, level))
        if counter is None:  # the label lookup, once per event name
            counter = self._event_counters[event, level] = self.events.labels(event, level)
        counter.inc()


class _DaemonCollector(Collector):
    """Gauges read from the daemon at scrape time."""

    def __init__(
        self,
        settings: Settings,
        daemon: DaemonState,
        job_runs: JobRuns,
        store: VerdictStore | None,
    ) -> None:
        self._settings = settings
        self._daemon = daemon
        self._job_runs = job_runs
        self._store = store

    def collect(self) -> Iterable[Metric]:
        d = self._daemon
        s = self._settings
        now = time.time()
        yield _gauge(
            "watcher_queue_depth", "Files waiting in the in-memory queue.", d.queue_depth()
        )
        yield _gauge(
            "watcher_delivery_failing",
            "Destinations (processed, quarantine) refusing deliveries right now; files wait.",
            len(d.failing_destinations()),
        )
        yield _gauge("watcher_in_flight", "Files being scanned or delivered now.", d.in_flight)
        oldest = oldest_pending_s(d.uploads(), s.staging_root, now)
        yield _gauge(
            "watcher_oldest_pending_seconds",
            "Age of the oldest file not yet delivered (in uploads or claimed); 0 if none.",
            oldest,
        )
        clamd_up = s.scanning_enabled and d.probe_clamd(s.probe_timeout_s) is None
        yield _gauge("watcher_clamd_up", "1 if clamd answers PING.", 1 if clamd_up else 0)
        trusted = d.clamd_distrust() is None
        yield _gauge(
            "watcher_clamd_trusted", "1 if clamd answered its canaries right.", 1 if trusted else 0
        )
        yield from clamd_endpoint_metrics(d.clamd_endpoints())
        yield self._definitions_age(now)
        yield _gauge(
            "watcher_definitions_stale",
            "1 if the loaded definitions are stale.",
            1 if d.definitions.stale else 0,
        )
        files, size = quarantine_usage(s.quarantine_dir)
        yield _gauge("watcher_quarantine_files", "Files held in quarantine.", files)
        yield _gauge("watcher_quarantine_bytes", "Bytes held in quarantine.", size)
        yield self._quarantine_cap()
        yield from self._jobs()
        yield from self._outbox()

    def _outbox(self) -> Iterator[Metric]:
        if self._store is None:
            return
        yield _gauge(
            "watcher_verdict_store_up",
            "1 if the verdict store took its last write (0: a database down; claims wait).",
            0 if self._store.problem() else 1,
        )
        try:
            waiting, dead = self._store.outbox_counts()
        except Exception:  # the store is busy or gone: the gauges wait for the next scrape
            return
        yield _gauge(
            "watcher_webhook_events_waiting",
            "Webhook events not delivered yet (retried with backoff).",
            waiting,
        )
        yield _gauge(
            "watcher_webhook_dead_letters",
            "Webhook events given up after WATCHER_WEBHOOK_MAX_ATTEMPTS (kept for the retention).",
            dead,
        )

    def _definitions_age(self, now: float) -> Metric:
        family = GaugeMetricFamily(
            "watcher_definitions_age_seconds",
            "Age of the loaded virus definitions (absent when clamd reports no date).",
        )
        loaded = self._daemon.definitions.loaded
        age = loaded.age_s(datetime.fromtimestamp(now, UTC)) if loaded else None
        if age is not None:
            family.add_metric([], age)
        return family

    def _quarantine_cap(self) -> Metric:
        family = GaugeMetricFamily(
            "watcher_quarantine_max_bytes",
            "WATCHER_QUARANTINE_MAX_BYTES, the retention job's cap (absent when there is none).",
        )
        cap = self._settings.quarantine_max_bytes
        if cap:
            family.add_metric([], cap)
        return family

    def _jobs(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            "watcher_job_last_success_timestamp_seconds",
            "Unix time of each scheduled job's last success.",
            labels=["job"],
        )
        failure = GaugeMetricFamily(
            "watcher_job_last_failure_timestamp_seconds",
            "Unix time of each scheduled job's last failure.",
            labels=["job"],
        )
        for name, run in sorted(self._job_runs.snapshot().items()):
            if run.last_success is not None:
                success.add_metric([name], run.last_success.timestamp())
            if run.last_failure is not None:
                failure.add_metric([name], run.last_failure.timestamp())
        yield success
        yield failure


def clamd_endpoint_metrics(endpoints: list[EndpointStatus]) -> Iterator[Metric]:
    """Per endpoint of a clamd pool (label `endpoint`, ``host:port``); absent without one."""
    state = GaugeMetricFamily(
        "watcher_clamd_endpoint_state",
        "1 for each clamd endpoint's current state: ready (gets files), unchecked, down, "
        "untrusted (answered a canary wrongly).",
        labels=["endpoint", "state"],
    )
    in_flight = GaugeMetricFamily(
        "watcher_clamd_endpoint_in_flight",
        "Scans in flight on each clamd endpoint.",
        labels=["endpoint"],
    )
    capacity = GaugeMetricFamily(
        "watcher_clamd_endpoint_max_threads",
        "Each clamd endpoint's MaxThreads: the scans sent to it at once.",
        labels=["endpoint"],
    )
    scans = CounterMetricFamily(
        "watcher_clamd_endpoint_scans",
        "Scans each clamd endpoint answered.",
        labels=["endpoint"],
    )
    failures = CounterMetricFamily(
        "watcher_clamd_endpoint_failures",
        "Connections each clamd endpoint refused, and scans it lost.",
        labels=["endpoint"],
    )
    for e in endpoints:
        for name in STATES:
            state.add_metric([e.endpoint, name], 1 if e.state == name else 0)
        in_flight.add_metric([e.endpoint], e.in_flight)
        capacity.add_metric([e.endpoint], e.capacity)
        scans.add_metric([e.endpoint], e.scans)
        failures.add_metric([e.endpoint], e.failures)
    yield from (state, in_flight, capacity, scans, failures)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def quarantine_usage(quarantine_dir: Path) -> tuple[int, int]:
    """Quarantined files (not their .json records, not temp files) and their total size."""
    files = size = 0
    try:
        entries = list(os.scandir(quarantine_dir))
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith(".json"):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                files += 1
                size += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return files, size


def oldest_pending_s(
    uploads: Iterable[tuple[Path, os.stat_result]], staging_root: Path, now: float
) -> float:
    """Seconds since the oldest waiting file arrived (its ctime: a rename or link counts)."""
    oldest = now
    for _, st in uploads:
        if stat.S_ISREG(st.st_mode):
            oldest = min(oldest, st.st_ctime)
    for claim in claimed_files(staging_root):
        oldest = min(oldest, _ctime(claim, now, delivered_links=True))
    return max(0.0, now - oldest)


def _ctime(path: Path, default: float, delivered_links: bool = False) -> float:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return default
    if delivered_links and st.st_nlink > 1:
        return default  # a claim already linked into its destination: only the commit is left
    return st.st_ctime
