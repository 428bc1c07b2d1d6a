"""The scheduled jobs beside the daemon: one APScheduler BackgroundScheduler in UTC.

| job                  | runs                             | does                               |
|----------------------|----------------------------------|------------------------------------|
| `update-definitions` | every 5 min; updates when due    | updates.Updater.tick               |
| `check-definitions`  | at start, then every 5 min       | staleness; outside updates: rescan |
| `purge-quarantine`   | a minute after start, then daily | retention.Retention.run            |
| `prune-deliveries`   | hourly                           | the delivery log past the window   |
| `prune-verdicts`     | 5 min after start, then hourly   | the verdict store's retention      |

Jobs never overlap themselves (max_instances=1, coalesce). One that raises is logged `job.failed`
and keeps its schedule. `shutdown()` tells running jobs to stop (they check `stop` between steps
and terminate a running freshclam) and waits for them within the grace time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from watcher.archives import look_inside_from_settings
from watcher.clamav import Scanner
from watcher.definitions import (
    DefinitionsState,
    Freshness,
    LoadedDefinitions,
    StalenessTracker,
    database_files,
    definitions_age_s,
    newest_file_time,
)
from watcher.errors import ClamdUnavailable
from watcher.jobs.deliveries import DeliveryLog
from watcher.jobs.rescan import Rescanner
from watcher.jobs.retention import Retention
from watcher.jobs.status import JobStatus
from watcher.jobs.updates import ClamdControl, UpdateOutcome, Updater
from watcher.logs import emit
from watcher.recording import Recorder, recorder_from_settings
from watcher.settings import Settings

TICK_S = 300.0
MISFIRE_GRACE_S = 300
EXIT_OK, EXIT_FAILED = 0, 2


class Jobs:
    def __init__(
        self,
        settings: Settings,
        scanner: Scanner,
        definitions: DefinitionsState,
        on_reloaded: Callable[[], None] | None = None,
        status: JobStatus | None = None,
        allowlisted: Callable[[str], bool] = lambda sha256: False,
        recorder: Recorder | None = None,
    ) -> None:
        s = settings
        self.settings = settings
        self.recorder = recorder
        self.scanner = scanner
        self.definitions = definitions
        self.stop = threading.Event()
        self.deliveries = DeliveryLog(s.state_dir, s.processed_dir)
        self.rescanner = Rescanner(
            scanner,
            self.deliveries,
            s.quarantine_dir,
            s.rescan_window,
            self.stop,
            allowlisted,
            on_late=recorder.mark_late if recorder is not None else lambda record, location: None,
            look_inside=look_inside_from_settings(s, scanner),
        )
        self.status = status or JobStatus()
        self.retention = Retention(s.quarantine_dir, s.quarantine_retention, s.quarantine_max_bytes)
        self.updater = Updater(
            s.update_argv,
            cast(ClamdControl, scanner),
            s.definitions_dir,
            s.state_dir,
            definitions,
            self.rescanner,
            s.update_interval,
            s.update_timeout,
            self.stop,
            on_reloaded=on_reloaded,
        )
        self.staleness = StalenessTracker(s.definitions_max_age)
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": MISFIRE_GRACE_S,
            },
        )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        s, now = self.settings, datetime.now(UTC)
        if s.scanning_enabled and s.update_argv:
            tick = min(TICK_S, s.update_interval)
            self._add(
                self.update_definitions, "update-definitions", tick, now + timedelta(seconds=tick)
            )
            if s.update_interval < 3600:
                emit("definitions.update_interval_short", interval_s=s.update_interval)
        if s.scanning_enabled:
            self._add(self.check_definitions, "check-definitions", TICK_S, now)
            if not database_files(s.definitions_dir):
                emit("definitions.dir_empty", path=str(s.definitions_dir))
        self._add(self.purge_quarantine, "purge-quarantine", 86400.0, now + timedelta(minutes=1))
        self._add(self.prune_deliveries, "prune-deliveries", 3600.0, now + timedelta(hours=1))
        if self.recorder is not None and self.recorder.store is not None:
            first = now + timedelta(minutes=5)
            self._add(self.prune_verdicts, "prune-verdicts", 3600.0, first)
        self.scheduler.add_listener(self._on_failure, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        self.scheduler.add_listener(self._on_success, EVENT_JOB_EXECUTED)
        self.scheduler.start()

    def shutdown(self, grace_s: float) -> None:
        """Ask running jobs to stop, and wait for them at most `grace_s`. Idempotent."""
        self.stop.set()
        if not self.scheduler.running:
            return
        waiter = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True})
        waiter.start()
        waiter.join(timeout=grace_s)
        if waiter.is_alive():
            emit("jobs.unfinished", grace_s=grace_s)

    def run_now(self, job_id: str) -> None:
        """Run a job at once (its schedule continues from there)."""
        self.scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))

    def _add(
        self, func: Callable[[], object], job_id: str, every_s: float, first: datetime
    ) -> None:
        trigger = IntervalTrigger(seconds=every_s, timezone="UTC")
        self.scheduler.add_job(func, trigger, id=job_id, name=job_id, next_run_time=first)

    def _on_success(self, event: JobExecutionEvent) -> None:
        if event.job_id != "update-definitions":  # that one reports its own outcome
            self.status.record_success(event.job_id, datetime.now(UTC))

    def _on_failure(self, event: JobExecutionEvent) -> None:
        self.status.record_failure(
            "update" if event.job_id == "update-definitions" else event.job_id, datetime.now(UTC)
        )
        if event.code == EVENT_JOB_MISSED:
            emit(
                "job.failed",
                job=event.job_id,
                reason="missed",
                scheduled_at=event.scheduled_run_time.isoformat(),
            )
            return
        exc = event.exception
        emit(
            "job.failed", job=event.job_id, reason=type(exc).__name__, error=str(exc), exception=exc
        )

    # -- the jobs -----------------------------------------------------------------------

    def update_definitions(self) -> UpdateOutcome:
        outcome = self.updater.tick(datetime.now(UTC))
        # Recorded as job "update", the name the alert rules use.
        if outcome in (UpdateOutcome.UPDATED, UpdateOutcome.CURRENT):
            self.status.record_success("update", datetime.now(UTC))
        elif outcome is UpdateOutcome.FAILED:
            self.status.record_failure("update", datetime.now(UTC))
        return outcome

    def check_definitions(self, now: datetime | None = None) -> None:
        """Age of clamd's definitions against WATCHER_DEFINITIONS_MAX_AGE; one event per change.

        A new daily version that we did not load ourselves (an outside freshclam with
        NotifyClamd, or clamd's SelfCheck) means new signatures too: recent files are rescanned.
        """
        now = now or datetime.now(UTC)
        try:
            version = self.scanner.version()
        except ClamdUnavailable:
            return  # clamd.down is the daemon's to report
        previous, loaded = self.definitions.loaded, LoadedDefinitions.parse(version)
        self.definitions.update(loaded)
        age_s = definitions_age_s(loaded, newest_file_time(self.settings.definitions_dir), now)
        self.definitions.set_age(age_s)
        change = self.staleness.observe(age_s)
        fields: dict[str, Any] = {
            "age_s": round(age_s or 0.0),
            "max_age_s": self.settings.definitions_max_age,
            "clamd_version": version,
        }
        if change is Freshness.STALE:
            self.definitions.set_stale(True)
            emit("definitions.stale", **fields)
        elif change is Freshness.FRESH:
            self.definitions.set_stale(False)
            emit("definitions.fresh", **fields)
        if previous and previous.version and loaded.version and loaded.version != previous.version:
            emit("definitions.changed", clamd_version=version, previous=previous.version)
            self.updater.rescan_if_idle(now)

    def purge_quarantine(self) -> None:
        self.retention.run(datetime.now(UTC))

    def prune_deliveries(self) -> None:
        self.deliveries.prune(datetime.now(UTC), self.settings.rescan_window)

    def prune_verdicts(self, now: datetime | None = None) -> int:
        """The verdict store's retention: by age, then by count (the oldest first)."""
        store = self.recorder.store if self.recorder is not None else None
        if store is None:
            return 0
        s, now = self.settings, now or datetime.now(UTC)
        cutoff = (now - timedelta(seconds=s.verdict_retention)).timestamp()
        deleted = store.prune(cutoff, s.verdict_max_records)
        if deleted:
            emit(
                "verdicts.pruned",
                deleted=deleted,
                max_age_s=s.verdict_retention,
                max_records=s.verdict_max_records,
            )
        return deleted


# -- the same code, once, from the CLI ----------------------------------------------------


def update_definitions_once(settings: Settings, scanner: Scanner) -> int:
    """`watcher update-definitions`: exit 0 updated or already current, 2 failed."""
    if not settings.update_argv:
        emit("definitions.update_failed", cause="no_command")
        return EXIT_FAILED
    recorder = recorder_from_settings(settings)  # a late detection updates the stored verdict
    recorder.open()
    try:
        jobs = Jobs(settings, scanner, DefinitionsState(), recorder=recorder)
        outcome = jobs.updater.update_now(datetime.now(UTC))
    finally:
        recorder.close()
    return EXIT_OK if outcome in (UpdateOutcome.UPDATED, UpdateOutcome.CURRENT) else EXIT_FAILED


def purge_quarantine_once(settings: Settings, dry_run: bool) -> int:
    """`watcher purge-quarantine [--dry-run]`: exit 0 done, 2 on a filesystem error."""
    retention = Retention(
        settings.quarantine_dir, settings.quarantine_retention, settings.quarantine_max_bytes
    )
    try:
        plan = retention.run(datetime.now(UTC), dry_run=dry_run)
    except OSError as err:
        emit("quarantine.purge_failed", reason=str(err))
        return EXIT_FAILED
    if dry_run:
        for item, reason in plan.delete:
            print(f"would delete {item.id} ({reason}, {item.size_bytes} bytes)", flush=True)
    return EXIT_OK
