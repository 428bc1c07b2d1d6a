"""Scheduled jobs, real programs: freshclam from a loopback mirror, clamd RELOAD, rescans."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sigserver import SignatureServer, freshclam_command
from support import EICAR, Clamd, Events, files_under, quarantined, run_cli, wait_until

from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.jobs.deliveries import Delivery
from watcher.jobs.status import JobStatus
from watcher.jobs.updates import UpdateOutcome
from watcher.service import Service
from watcher.settings import Settings
from watcher.verdict import Infected, Verdict

MakeSettings = Callable[..., Settings]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[SignatureServer]:
    server = SignatureServer(tmp_path / "mirror").start()
    yield server
    server.stop()


@pytest.fixture
def jobs_for(events: Events) -> Iterator[Callable[[Settings], Jobs]]:
    """Jobs on their own (no intake), scheduler started; shut down at the end of the test."""
    started: list[Jobs] = []

    def make(settings: Settings) -> Jobs:
        jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
        jobs.start()
        started.append(jobs)
        return jobs

    yield make
    for jobs in started:
        jobs.shutdown(10)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def new_marker() -> bytes:
    return b"WATCHER-LATE-MARKER-" + secrets.token_hex(8).encode()


def test_new_signatures_move_a_delivered_file_to_quarantine_and_stop_new_uploads(
    make_settings: MakeSettings,
    own_clamd: Clamd,
    dirs: dict[str, Path],
    events: Events,
    mirror: SignatureServer,
    tmp_path: Path,
) -> None:
    marker = new_marker()
    late_body = b"quarterly report\n" + marker + b"\nend\n"
    command = freshclam_command(tmp_path / "freshclam.conf", own_clamd.db, mirror.url("new.ndb"))
    daemon = Service(
        make_settings(
            clamav_socket=own_clamd.socket, definitions_dir=own_clamd.db, update_command=command
        )
    )
    daemon.start()
    try:
        write(dirs["uploads"] / "docs" / "late.bin", late_body)
        write(dirs["uploads"] / "plain.txt", b"nothing to see\n")
        events.wait_for("file.clean", path="docs/late.bin")
        events.wait_for("file.clean", path="plain.txt")
        assert (dirs["processed"] / "docs" / "late.bin").read_bytes() == late_body

        mirror.publish("new.ndb", {"Watcher.Test.Late": marker})
        daemon.jobs.run_now("update-definitions")

        (updated,) = events.wait_for("definitions.updated", timeout_s=60)
        assert updated["sigs"] == 1 and updated["reload_confirmed"] is True
        assert updated["databases"] == {"new.ndb": {"version": "custom database", "sigs": 1}}
        (late,) = events.wait_for("file.infected_late", path="docs/late.bin")
        assert late["level"] == "ERROR" and late["signature"]
        assert files_under(dirs["processed"]) == {"plain.txt": b"nothing to see\n"}
        (meta,) = quarantined(dirs["quarantine"])
        assert meta["bytes"] == late_body and meta["detected_late"] is True
        assert meta["original_path"] == "docs/late.bin" and meta["verdict"] == "infected"
        assert (os.stat(dirs["quarantine"] / meta["id"]).st_mode & 0o377) == 0
        (finished,) = events.wait_for("rescan.finished")
        assert finished["scanned"] == 2 and finished["infected"] == 1

        write(dirs["uploads"] / "again.bin", b"x" + marker)
        events.wait_for("file.infected", path="again.bin")
        assert {r["original_path"] for r in quarantined(dirs["quarantine"])} == {
            "docs/late.bin",
            "again.bin",
        }
        assert files_under(dirs["processed"]) == {"plain.txt": b"nothing to see\n"}
        state = json.loads((dirs["state"] / "updates.json").read_text())
        assert state["failures"] == 0 and state["pending"] is None
        job = daemon.jobs.scheduler.get_job("update-definitions")
        assert job is not None and job.next_run_time > datetime.now(UTC)
    finally:
        daemon.close()


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

    failed = _cli(env, "update-definitions")
    assert failed.returncode == 2
    assert _events(failed)["definitions.update_failed"]["cause"] == "download_failed"

    marker = new_marker()
    mirror.publish("new.ndb", {"Watcher.Test.Cli": marker})
    updated = _cli(env, "update-definitions")
    assert updated.returncode == 0, updated.stdout
    assert _events(updated)["definitions.updated"]["sigs"] == 1
    assert isinstance(_scan_bytes(own_clamd, marker), Infected)

    current = _cli(env, "update-definitions")
    assert current.returncode == 0
    assert "definitions.current" in _events(current)
    assert "definitions.updated" not in _events(current)


def test_cli_purge_quarantine_dry_run_lists_and_real_run_deletes(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    now = datetime.now(UTC)
    old = _quarantine_item(dirs["quarantine"], "old", now - timedelta(days=31), b"old bytes")
    young = _quarantine_item(dirs["quarantine"], "young", now - timedelta(days=1), b"young")

    dry = _cli(subprocess_env, "purge-quarantine", "--dry-run")
    assert dry.returncode == 0
    assert f"would delete {old} (expired" in dry.stdout
    assert young not in dry.stdout
    assert len(list(dirs["quarantine"].iterdir())) == 4

    real = _cli(subprocess_env, "purge-quarantine")
    assert real.returncode == 0
    purged = _events(real)["quarantine.purged"]
    assert purged["count"] == 1 and purged["expired"] == 1 and purged["dry_run"] is False
    assert sorted(p.name for p in dirs["quarantine"].iterdir()) == [young, f"{young}.json"]

    shutil.rmtree(dirs["quarantine"])
    dirs["quarantine"].write_bytes(b"not a directory")
    assert _cli(subprocess_env, "purge-quarantine").returncode == 2


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


def test_definitions_go_stale_once_and_fresh_again_with_a_passed_clock(
    make_settings: MakeSettings, events: Events
) -> None:
    settings = make_settings(definitions_max_age="48h")
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())  # not started
    now = datetime.now(UTC)

    jobs.check_definitions(now)
    assert jobs.definitions.stale is False and events.named("definitions.stale") == []
    jobs.check_definitions(now + timedelta(hours=49))
    jobs.check_definitions(now + timedelta(hours=60))
    (stale,) = events.named("definitions.stale")
    assert stale["level"] == "ERROR" and stale["age_s"] >= 49 * 3600
    assert jobs.definitions.stale is True
    jobs.check_definitions(now)
    (fresh,) = events.named("definitions.fresh")
    assert fresh["level"] == "INFO" and jobs.definitions.stale is False


def test_rescan_skips_files_replaced_or_gone_and_deliveries_outside_the_window(
    make_settings: MakeSettings, dirs: dict[str, Path], events: Events
) -> None:
    settings = make_settings(rescan_window="24h")
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    now = datetime.now(UTC)
    processed = dirs["processed"]
    kept = _delivered(jobs, processed / "a" / "infected.com", EICAR, now - timedelta(hours=1))
    _delivered(jobs, processed / "old.com", EICAR, now - timedelta(hours=25))
    _delivered(jobs, processed / "gone.com", EICAR, now).unlink()
    swapped = _delivered(jobs, processed / "swapped.com", b"clean")
    os.replace(write(processed / "new.tmp", EICAR), swapped)  # another file under its name

    report = jobs.rescanner.run(now)

    assert (report.scanned, report.infected, report.skipped) == (1, 1, 2)
    assert files_under(processed) == {"old.com": EICAR, "swapped.com": EICAR}
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["original_path"] == "a/infected.com" and meta["bytes"] == EICAR
    assert meta["processed_path"] == "a/infected.com" and meta["detected_late"] is True
    assert not kept.exists()
    events.wait_for("file.infected_late", path="a/infected.com")


def test_rescan_moves_a_late_detection_across_filesystems(
    make_settings: MakeSettings, dirs: dict[str, Path], tmp_path: Path
) -> None:
    shm = Path("/dev/shm") / f"watcher-test-{os.getpid()}-{tmp_path.name}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    try:
        settings = make_settings(quarantine_dir=shm / "q")
        jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
        _delivered(jobs, dirs["processed"] / "x.com", EICAR)
        report = jobs.rescanner.run(datetime.now(UTC))
        assert report.infected == 1
        assert files_under(dirs["processed"]) == {}
        (meta,) = quarantined(shm / "q")
        assert meta["bytes"] == EICAR and meta["detected_late"] is True
        assert not [p for p in (shm / "q").iterdir() if p.name.startswith(".")]
    finally:
        shutil.rmtree(shm, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------


def _delivered(jobs: Jobs, path: Path, data: bytes, at: datetime | None = None) -> Path:
    """A file in processed plus its delivery-log entry, as the daemon would leave them."""
    write(path, data)
    st = path.stat()
    rel = str(path.relative_to(jobs.settings.processed_dir))
    at = at or datetime.now(UTC)
    sha = hashlib.sha256(data).hexdigest()
    jobs.deliveries.append(Delivery(at, rel, rel, len(data), sha, st.st_dev, st.st_ino))
    return path


def _quarantine_item(qdir: Path, name: str, detected_at: datetime, data: bytes) -> str:
    qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    item_id = f"{detected_at:%Y%m%dT%H%M%SZ}-{name}"
    meta = {"id": item_id, "original_path": name, "detected_at": detected_at.isoformat()}
    (qdir / f"{item_id}.json").write_text(json.dumps(meta))
    (qdir / item_id).write_bytes(data)
    (qdir / item_id).chmod(0o400)
    return item_id


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={**env, "WATCHER_LOG_FORMAT": "json"})


def _events(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[record["event"]] = record
    return found


def _scan_bytes(clamd: Clamd, data: bytes) -> Verdict:
    fd = os.memfd_create("probe")
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return clamd.scanner.scan_fd(fd)
    finally:
        os.close(fd)


def test_a_reload_left_pending_by_a_crash_is_finished_at_the_next_tick(
    make_settings: MakeSettings, own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    marker = new_marker()
    settings = make_settings(
        clamav_socket=own_clamd.socket, definitions_dir=own_clamd.db, update_command="false"
    )
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    served = _delivered(jobs, dirs["processed"] / "served.txt", b"<" + marker + b">")
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


def test_rescan_leaves_bytes_an_operator_restored_as_a_false_positive(
    make_settings: MakeSettings, dirs: dict[str, Path], events: Events
) -> None:
    """A restore allowlists the sha256; new signatures must not take the file away again."""
    settings = make_settings()
    restored = EICAR + b" restored"
    sha = hashlib.sha256(restored).hexdigest()
    jobs = Jobs(
        settings, scanner_from_settings(settings), DefinitionsState(),
        allowlisted=lambda digest: digest == sha,
    )  # fmt: skip
    _delivered(jobs, dirs["processed"] / "ok.com", restored)
    _delivered(jobs, dirs["processed"] / "bad.com", EICAR)
    report = jobs.rescanner.run(datetime.now(UTC))
    assert (report.infected, report.skipped) == (1, 1)
    assert files_under(dirs["processed"]) == {"ok.com": restored}
    assert [m["original_path"] for m in quarantined(dirs["quarantine"])] == ["bad.com"]


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
