"""Late detection: files delivered within the rescan window are scanned again after new
signatures, and moved to quarantine if they are now caught (watcher/jobs/rescan.py, with its
delivery log)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_cases import CLEAN, INFECTED, python_zip
from harness import EICAR
from harness.clamd import Clamd
from harness.events import Events, wait_until
from harness.files import files_under, plant_delivery, quarantined, write
from harness.mirror import SignatureServer, freshclam_command, unique_marker
from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.jobs.deliveries import Delivery, DeliveryLog
from watcher.service import Service
from watcher.settings import Settings

MakeSettings = Callable[..., Settings]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0


def test_new_signatures_move_a_delivered_file_to_quarantine_and_stop_new_uploads(
    make_settings: MakeSettings,
    own_clamd: Clamd,
    dirs: dict[str, Path],
    events: Events,
    mirror: SignatureServer,
    tmp_path: Path,
) -> None:
    marker = unique_marker()
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


def test_rescan_skips_files_replaced_or_gone_and_deliveries_outside_the_window(
    make_settings: MakeSettings, dirs: dict[str, Path], events: Events
) -> None:
    settings = make_settings(rescan_window="24h")
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    now = datetime.now(UTC)
    processed = dirs["processed"]
    kept = plant_delivery(jobs, processed / "a" / "infected.com", EICAR, now - timedelta(hours=1))
    plant_delivery(jobs, processed / "old.com", EICAR, now - timedelta(hours=25))
    plant_delivery(jobs, processed / "gone.com", EICAR, now).unlink()
    swapped = plant_delivery(jobs, processed / "swapped.com", b"clean")
    os.replace(write(processed / "new.tmp", EICAR), swapped)  # another file under its name

    report = jobs.rescanner.run(now)

    assert (report.scanned, report.infected, report.skipped) == (1, 1, 2)
    assert files_under(processed) == {"old.com": EICAR, "swapped.com": EICAR}
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["original_path"] == "a/infected.com" and meta["bytes"] == EICAR
    assert meta["processed_path"] == "a/infected.com" and meta["detected_late"] is True
    assert not kept.exists()
    events.wait_for("file.infected_late", path="a/infected.com")


def test_rescan_looks_into_archives_clamd_cannot_read(
    make_settings: MakeSettings, dirs: dict[str, Path], events: Events
) -> None:
    """A ZIP64 (clamd 1.4 answers OK for it) delivered before its member's signature existed
    is caught by the rescan, as at delivery; its clean twin stays."""
    settings = make_settings()
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    infected, clean = python_zip(INFECTED, zip64=True), python_zip(CLEAN, zip64=True)
    plant_delivery(jobs, dirs["processed"] / "in" / "bad.zip", infected)
    plant_delivery(jobs, dirs["processed"] / "good.zip", clean)

    report = jobs.rescanner.run(datetime.now(UTC))

    assert (report.scanned, report.infected, report.failed) == (2, 1, 0)
    assert files_under(dirs["processed"]) == {"good.zip": clean}
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["original_path"] == "in/bad.zip" and meta["bytes"] == infected
    assert meta["detected_late"] is True
    (late,) = events.wait_for("file.infected_late", path="in/bad.zip")
    assert late["signature"]


def test_rescan_moves_a_late_detection_across_filesystems(
    make_settings: MakeSettings, dirs: dict[str, Path], tmp_path: Path
) -> None:
    shm = Path("/dev/shm") / f"watcher-test-{os.getpid()}-{tmp_path.name}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    try:
        settings = make_settings(quarantine_dir=shm / "q")
        jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
        plant_delivery(jobs, dirs["processed"] / "x.com", EICAR)
        report = jobs.rescanner.run(datetime.now(UTC))
        assert report.infected == 1
        assert files_under(dirs["processed"]) == {}
        (meta,) = quarantined(shm / "q")
        assert meta["bytes"] == EICAR and meta["detected_late"] is True
        assert not [p for p in (shm / "q").iterdir() if p.name.startswith(".")]
    finally:
        shutil.rmtree(shm, ignore_errors=True)


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
    plant_delivery(jobs, dirs["processed"] / "ok.com", restored)
    plant_delivery(jobs, dirs["processed"] / "bad.com", EICAR)
    report = jobs.rescanner.run(datetime.now(UTC))
    assert (report.infected, report.skipped) == (1, 1)
    assert files_under(dirs["processed"]) == {"ok.com": restored}
    assert [m["original_path"] for m in quarantined(dirs["quarantine"])] == ["bad.com"]


def test_delivery_log_keeps_the_window_and_skips_a_torn_line(tmp_path: Path) -> None:
    log = DeliveryLog(tmp_path / "state", tmp_path / "processed")
    for hours in (30, 25, 2, 1):
        log.append(Delivery(T0 - timedelta(hours=hours), f"f{hours}", f"f{hours}", 1, None, 1, 2))
    log.flush()  # appends are gathered for GATHER_S before they are written
    with open(log.path, "ab") as f:
        f.write(b'{"at": "2026-03-01T11:')  # a crash mid-append
    assert [e.dest for e in log.entries(T0 - timedelta(hours=24))] == ["f2", "f1"]
    assert log.prune(T0, 24 * HOUR) == 2
    assert [e.dest for e in log.entries(T0 - timedelta(days=9))] == ["f2", "f1"]
    assert log.prune(T0, 24 * HOUR) == 0


def test_delivery_log_appends_survive_a_prune_by_another_process(tmp_path: Path) -> None:
    """The daemon keeps its log open; a prune elsewhere replaces the file under the lock."""
    daemon_log = DeliveryLog(tmp_path / "state", tmp_path / "processed")
    other_run = DeliveryLog(tmp_path / "state", tmp_path / "processed")
    daemon_log.append(Delivery(T0 - timedelta(hours=30), "old", "old", 1, None, 1, 2))
    daemon_log.append(Delivery(T0 - timedelta(hours=2), "kept", "kept", 1, None, 1, 3))
    daemon_log.flush()  # appends are gathered for GATHER_S before they are written
    assert other_run.prune(T0, 24 * HOUR) == 1
    daemon_log.append(Delivery(T0 - timedelta(hours=1), "new", "new", 1, None, 1, 4))
    daemon_log.close()
    assert [e.dest for e in other_run.entries(T0 - timedelta(days=9))] == ["kept", "new"]


def test_gathered_delivery_log_lines_reach_the_file_without_a_flush(tmp_path: Path) -> None:
    """Another process (`watcher update-definitions`) reads the file: a gathered line is
    written within GATHER_S even while nothing more is appended."""
    daemon_log = DeliveryLog(tmp_path / "state", tmp_path / "processed")
    other_run = DeliveryLog(tmp_path / "state", tmp_path / "processed")
    daemon_log.append(Delivery(T0, "soon", "soon", 1, None, 1, 2))
    try:
        wait_until(lambda: other_run.entries(T0 - timedelta(hours=1)), 5, "the line on disk")
    finally:
        daemon_log.close()
