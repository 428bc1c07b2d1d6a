"""Definition updates: freshclam from a loopback mirror, clamd RELOAD confirmed, failures by
cause with back-off, and definitions changed outside watcher (watcher/jobs/updates.py)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness.clamd import Clamd
from harness.daemon import json_records, run_cli_json
from harness.events import Events, wait_until
from harness.files import plant_delivery, quarantined
from harness.mirror import SignatureServer, freshclam_command, unique_marker
from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.jobs.deliveries import Delivery
from watcher.jobs.updates import (
    UpdateOutcome,
    UpdateState,
    failure_cause,
    next_attempt_at,
    run_command,
    updated_databases,
)
from watcher.settings import Settings
from watcher.verdict import Clean, Infected, Verdict

MakeSettings = Callable[..., Settings]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0


def test_first_check_runs_at_once_then_every_interval_from_the_last_attempt() -> None:
    assert next_attempt_at(UpdateState(), 4 * HOUR, None) is None
    done = UpdateState(last_attempt_at=T0)
    assert next_attempt_at(done, 4 * HOUR, None) == T0 + timedelta(hours=4)


def test_a_freshclam_run_outside_watcher_counts_as_the_last_check() -> None:
    ran = T0 + timedelta(hours=3)  # e.g. the container's first-start freshclam
    assert next_attempt_at(UpdateState(last_attempt_at=T0), 4 * HOUR, ran) == ran + timedelta(
        hours=4
    )
    assert next_attempt_at(UpdateState(), 4 * HOUR, ran) == ran + timedelta(hours=4)


def test_failures_back_off_doubling_up_to_a_day() -> None:
    attempts = [
        next_attempt_at(UpdateState(last_attempt_at=T0, failures=n), 4 * HOUR, None)
        for n in (1, 2, 3, 4, 10)
    ]
    delays = [at - T0 for at in attempts if at is not None]
    assert [d.total_seconds() / HOUR for d in delays] == [4, 8, 16, 24, 24]


def test_a_cdn_refusal_waits_at_least_a_day() -> None:
    for cause in ("rate_limited", "forbidden"):
        state = UpdateState(last_attempt_at=T0, failures=1, last_cause=cause)
        assert next_attempt_at(state, HOUR, None) == T0 + timedelta(hours=24)


@pytest.mark.parametrize(
    ("code", "output", "cause"),
    [
        (11, ["ERROR: Can't download new.ndb"], "download_failed"),
        (5, ["ERROR: Download failed (7)"], "network"),
        (52, [], "network"),
        (56, [], "config"),
        (8, ["ERROR: Database test FAILED."], "test_failed"),
        (18, [], "rate_limited"),
        (17, [], "forbidden"),
        (14, ["FreshClam received error code 429 from the ClamAV CDN"], "rate_limited"),
        (14, ["You are on cool-down until after: 2026-03-02"], "rate_limited"),
        (14, ["FreshClam received error code 403 from the ClamAV CDN"], "forbidden"),
        (77, [], "exit_77"),
        (-9, [], "signal_9"),
    ],
)
def test_exit_codes_and_cdn_messages_map_to_a_stable_cause(
    code: int, output: list[str], cause: str
) -> None:
    assert failure_cause(code, output) == cause


def test_updated_databases_are_read_from_freshclam_output() -> None:
    output = [
        "daily.cld updated (version: 27100, sigs: 2070000, f-level: 90, builder: raynman)",
        "main.cvd database is up-to-date (version: 62, sigs: 6647427, f-level: 90)",
        "new.ndb updated (version: custom database, sigs: 3)",
    ]
    assert updated_databases(output) == {
        "daily.cld": {"version": "27100", "sigs": 2070000},
        "new.ndb": {"version": "custom database", "sigs": 3},
    }


def test_commands_run_without_a_shell_and_report_not_found_and_timeout() -> None:
    stop = threading.Event()
    assert run_command(["/nonexistent/freshclam"], 5, stop).cause == "not_found"
    assert run_command(["sh", "-c", "exec sleep 30"], 0.3, stop).cause == "timeout"
    echoed = run_command(["echo", "$HOME;", "`id`"], 5, stop)
    assert echoed.ok and echoed.output == ["$HOME; `id`"]


# -- definitions changed outside watcher ------------------------------------------------------


class _VersionedScanner:
    """One faked seam: clamd whose daily version we choose, detecting one marker once told to."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.daily = 27100

    def version(self) -> str:
        return f"ClamAV 1.4.6/{self.daily}/Sun Mar  1 10:00:00 2026"

    def ping(self) -> None:
        pass

    def reload(self) -> str:
        return "RELOADING"

    def scan_fd(self, fd: int) -> Verdict:
        data = os.pread(fd, 1 << 20, 0)
        return Infected("Test.Marker") if self.daily > 27100 and self.marker in data else Clean()


def test_a_new_daily_version_loaded_outside_watcher_triggers_a_rescan(
    make_offline_settings: MakeSettings, dirs: dict[str, Path], events: Events
) -> None:
    settings = make_offline_settings()
    scanner = _VersionedScanner(b"MARKER")
    jobs = Jobs(settings, scanner, DefinitionsState())
    target = dirs["processed"] / "served.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a MARKER b")
    st = target.stat()
    now = datetime.now(UTC)
    jobs.deliveries.append(
        Delivery(now, "served.bin", "served.bin", 10, None, st.st_dev, st.st_ino)
    )

    jobs.check_definitions(now)
    assert target.exists() and events.named("rescan.finished") == []
    scanner.daily = 27101  # freshclam with NotifyClamd, or clamd's SelfCheck, loaded more
    jobs.check_definitions(now)

    (late,) = events.named("file.infected_late")
    assert late["path"] == "served.bin" and late["level"] == "ERROR"
    assert not target.exists()
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["bytes"] == b"a MARKER b" and meta["detected_late"] is True


class _StuckClamd(_VersionedScanner):
    """clamd that answers but never loads anything new."""

    reloads = 0

    def reload(self) -> str:
        self.reloads += 1
        return "RELOADING"


def test_a_reload_that_never_completes_fails_and_backs_off(
    make_offline_settings: MakeSettings, tmp_path: Path, events: Events
) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "local.ndb").write_text("")
    script = tmp_path / "fake-freshclam"
    script.write_text(f"#!/bin/sh\necho x >> {db}/local.ndb\n")  # changes the definitions
    script.chmod(0o755)
    settings = make_offline_settings(definitions_dir=db, update_command=str(script))
    clamd = _StuckClamd(b"never")
    jobs = Jobs(settings, clamd, DefinitionsState())
    jobs.updater.reload_timeout_s = 0.2

    assert jobs.updater.tick(T0) is UpdateOutcome.FAILED
    (failed,) = events.named("definitions.update_failed")
    assert failed["cause"] == "reload_timeout" and failed["failures"] == 1
    assert jobs.updater.load_state().pending == "reload"
    assert (db / "watcher-canary.ndb").exists()
    reloads = clamd.reloads
    assert jobs.updater.tick(T0 + timedelta(minutes=5)) is UpdateOutcome.NOT_DUE
    assert clamd.reloads == reloads  # not hammered every tick


@pytest.mark.parametrize(("serve", "cause"), [("missing", "download_failed"), ("down", "network")])
def test_failed_update_is_reported_with_its_cause_and_keeps_its_schedule(
    make_settings: MakeSettings,
    jobs_for: Callable[[Settings], Jobs],
    events: Events,
    mirror: SignatureServer,
    tmp_path: Path,
    serve: str,
    cause: str,
) -> None:
    db = tmp_path / "db"
    db.mkdir()
    url = mirror.url("new.ndb")
    if serve == "down":
        mirror.stop()
    command = freshclam_command(tmp_path / "freshclam.conf", db, url)
    jobs = jobs_for(make_settings(definitions_dir=db, update_command=command))

    jobs.run_now("update-definitions")
    (failed,) = events.wait_for("definitions.update_failed", timeout_s=30)
    assert failed["level"] == "ERROR" and failed["cause"] == cause
    assert failed["exit_code"] not in (0, 1) and failed["output"]
    assert failed["failures"] == 1 and failed["next_attempt_at"]
    job = jobs.scheduler.get_job("update-definitions")
    assert job is not None and job.next_run_time > datetime.now(UTC)
    assert jobs.definitions.last_update[1] == cause
    # Once the job has let go of the lock, running it again does nothing: no hammering.
    again = wait_until(lambda: (o := jobs.update_definitions()) is not UpdateOutcome.BUSY and o)
    assert again is UpdateOutcome.NOT_DUE
    assert len(events.named("definitions.update_failed")) == 1
    assert events.named("definitions.updated") == []


def test_cli_update_definitions_exit_codes_and_current_when_nothing_changed(
    subprocess_env: dict[str, str],
    own_clamd: Clamd,
    mirror: SignatureServer,
    dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    command = freshclam_command(tmp_path / "freshclam.conf", own_clamd.db, mirror.url("new.ndb"))
    env = {
        **subprocess_env,
        "CLAMAV_SOCKET": str(own_clamd.socket),
        "WATCHER_DEFINITIONS_DIR": str(own_clamd.db),
        "WATCHER_UPDATE_COMMAND": command,
    }

    failed = run_cli_json("update-definitions", env=env)
    assert failed.returncode == 2
    assert json_records(failed.stdout)["definitions.update_failed"]["cause"] == "download_failed"

    marker = unique_marker()
    mirror.publish("new.ndb", {"Watcher.Test.Cli": marker})
    updated = run_cli_json("update-definitions", env=env)
    assert updated.returncode == 0, updated.stdout
    assert json_records(updated.stdout)["definitions.updated"]["sigs"] == 1
    assert isinstance(_scan_bytes(own_clamd, marker), Infected)

    current = run_cli_json("update-definitions", env=env)
    assert current.returncode == 0
    assert "definitions.current" in json_records(current.stdout)
    assert "definitions.updated" not in json_records(current.stdout)


def test_a_reload_left_pending_by_a_crash_is_finished_at_the_next_tick(
    make_settings: MakeSettings, own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    marker = unique_marker()
    settings = make_settings(
        clamav_socket=own_clamd.socket, definitions_dir=own_clamd.db, update_command="false"
    )
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    served = plant_delivery(jobs, dirs["processed"] / "served.txt", b"<" + marker + b">")
    # freshclam had installed a signature, then the daemon died before clamd reloaded.
    (own_clamd.db / "new.ndb").write_text(f"Watcher.Test.Crash:0:*:{marker.hex()}\n")
    dirs["state"].mkdir(exist_ok=True)
    now = datetime.now(UTC)
    (dirs["state"] / "updates.json").write_text(
        json.dumps({"last_attempt_at": now.isoformat(), "pending": "reload"})
    )

    # Not due for a download, but the reload left over happens, and the rescan after it.
    assert jobs.updater.tick(now) is UpdateOutcome.NOT_DUE
    (updated,) = events.named("definitions.updated")
    assert updated["reload_confirmed"] is True
    (late,) = events.named("file.infected_late")
    assert late["path"] == "served.txt" and not served.exists()
    assert jobs.updater.load_state().pending is None


def _scan_bytes(clamd: Clamd, data: bytes) -> Verdict:
    fd = os.memfd_create("probe")
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return clamd.scanner.scan_fd(fd)
    finally:
        os.close(fd)
