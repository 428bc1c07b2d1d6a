"""The job scheduler: a job that fails is logged and keeps its schedule, shutdown stops a running
job within the grace time, and each job's last outcome is recorded (watcher/jobs/)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from harness.events import Events
from harness.files import write
from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.jobs.status import JobStatus
from watcher.jobs.updates import UpdateOutcome
from watcher.settings import Settings

MakeSettings = Callable[..., Settings]


def test_a_job_that_raises_is_logged_and_keeps_its_schedule(
    make_settings: MakeSettings,
    jobs_for: Callable[[Settings], Jobs],
    events: Events,
    tmp_path: Path,
) -> None:
    not_a_dir = write(tmp_path / "quarantine-file", b"x")
    jobs = jobs_for(make_settings(quarantine_dir=not_a_dir))
    jobs.run_now("purge-quarantine")
    (failed,) = events.wait_for("job.failed", job="purge-quarantine")
    assert failed["level"] == "ERROR" and failed["reason"] == "NotADirectoryError"
    job = jobs.scheduler.get_job("purge-quarantine")
    assert job is not None and job.next_run_time > datetime.now(UTC)


def test_shutdown_stops_a_running_update_within_the_grace_time(
    make_settings: MakeSettings, events: Events, tmp_path: Path
) -> None:
    sleeper = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    settings = make_settings(update_command=sleeper, definitions_dir=tmp_path)
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    jobs.start()
    try:
        jobs.run_now("update-definitions")
        events.wait_for("definitions.update_started")
    finally:
        started = time.monotonic()
        jobs.shutdown(grace_s=10)
    assert time.monotonic() - started < 8
    (failed,) = events.wait_for("definitions.update_failed")
    assert failed["cause"] == "interrupted"
    assert events.named("jobs.unfinished") == []


def test_update_outcomes_are_recorded_as_job_update(make_settings: MakeSettings) -> None:
    """/metrics and the alert rules read `update`'s last success and failure from here."""
    settings = make_settings()
    status = JobStatus()
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState(), status=status)
    outcomes = iter([UpdateOutcome.FAILED, UpdateOutcome.NOT_DUE, UpdateOutcome.CURRENT])
    jobs.updater.tick = lambda now: next(outcomes)  # type: ignore[method-assign]
    jobs.update_definitions()
    failed = status.snapshot()["update"]
    assert failed.last_failure is not None and failed.last_success is None
    jobs.update_definitions()
    assert status.snapshot()["update"] == failed  # not due: nothing happened
    jobs.update_definitions()
    assert status.snapshot()["update"].last_success is not None
