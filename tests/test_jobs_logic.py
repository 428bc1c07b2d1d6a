"""The jobs' pure parts, with time passed in: schedules, causes, retention, staleness, the log."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import Events, quarantined, wait_until

from watcher.definitions import (
    DefinitionsState,
    Freshness,
    LoadedDefinitions,
    StalenessTracker,
    definitions_age_s,
    fingerprint,
    newest_file_time,
)
from watcher.errors import ConfigError
from watcher.jobs import Jobs
from watcher.jobs.deliveries import Delivery, DeliveryLog
from watcher.jobs.retention import Item, Reason, Retention, plan_purge
from watcher.jobs.updates import (
    UpdateOutcome,
    UpdateState,
    failure_cause,
    next_attempt_at,
    run_command,
    updated_databases,
)
from watcher.settings import Settings, load_settings
from watcher.verdict import Clean, Infected, Verdict

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0


# -- update schedule and causes ------------------------------------------------------------


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
    delays = [
        next_attempt_at(UpdateState(last_attempt_at=T0, failures=n), 4 * HOUR, None) - T0
        for n in (1, 2, 3, 4, 10)
    ]
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


# -- staleness ------------------------------------------------------------------------------


def test_version_dates_give_the_age_and_files_stand_in_when_there_is_none(tmp_path: Path) -> None:
    official = LoadedDefinitions.parse("ClamAV 1.4.6/27100/Sun Mar  1 10:00:00 2026")
    assert official.version == 27100 and official.built_at == T0 - timedelta(hours=2)
    assert definitions_age_s(official, T0 - timedelta(days=9), T0) == 2 * HOUR
    custom = LoadedDefinitions.parse("ClamAV 1.4.6")
    assert definitions_age_s(custom, T0 - timedelta(hours=5), T0) == 5 * HOUR
    assert definitions_age_s(custom, None, T0) is None

    (tmp_path / "a.ndb").write_text("x")
    (tmp_path / "freshclam.dat").write_text("y")
    (tmp_path / "watcher-canary.ndb").write_text("z")
    os.utime(tmp_path / "a.ndb", (T0.timestamp(), T0.timestamp()))
    os.utime(tmp_path / "freshclam.dat", (T0.timestamp() + 99, T0.timestamp() + 99))
    assert newest_file_time(tmp_path) == T0  # bookkeeping and the canary don't count
    assert {name for name, _, _ in fingerprint(tmp_path)} == {"a.ndb"}


def test_staleness_is_reported_once_per_change_of_state() -> None:
    tracker = StalenessTracker(max_age_s=48 * HOUR)
    ages = [HOUR, 49 * HOUR, 50 * HOUR, None, 60 * HOUR, 2 * HOUR, 3 * HOUR]
    assert [tracker.observe(a) for a in ages] == [
        None,
        Freshness.STALE,
        None,
        None,
        None,
        Freshness.FRESH,
        None,
    ]


# -- quarantine retention ---------------------------------------------------------------------


def _item(name: str, age: timedelta, size: int, data: bool = True) -> Item:
    return Item(name, T0 - age, size, Path(name) if data else None, Path(f"{name}.json"))


def test_expired_items_go_then_the_oldest_while_over_the_cap() -> None:
    items = [
        _item("expired", timedelta(days=31), 100),
        _item("oldest", timedelta(days=10), 300),
        _item("middle", timedelta(days=5), 300),
        _item("newest", timedelta(days=1), 300),
    ]
    plan = plan_purge(items, T0, 30 * 86400, max_bytes=700)
    assert [(i.id, r) for i, r in plan.delete] == [
        ("expired", Reason.EXPIRED),
        ("oldest", Reason.OVER_CAP),
    ]
    assert (plan.total_bytes, plan.remaining_bytes, plan.deleted_bytes) == (1000, 600, 400)
    assert plan_purge(items, T0, 30 * 86400, max_bytes=None).remaining_bytes == 900


def test_a_record_whose_file_is_still_arriving_is_not_purged_for_size() -> None:
    items = [_item("arriving", timedelta(seconds=5), 500, data=False), _item("b", timedelta(0), 1)]
    assert [i.id for i, _ in plan_purge(items, T0, 30 * 86400, max_bytes=10).delete] == ["b"]


def _quarantine(qdir: Path, item_id: str, detected_at: datetime, data: bytes | None) -> None:
    qdir.mkdir(mode=0o700, exist_ok=True)
    meta = {"id": item_id, "detected_at": detected_at.isoformat()}
    (qdir / f"{item_id}.json").write_text(json.dumps(meta))
    if data is not None:
        (qdir / item_id).write_bytes(data)
        (qdir / item_id).chmod(0o400)


def test_retention_deletes_files_with_their_metadata_and_warns_near_full(
    tmp_path: Path, events: Events
) -> None:
    qdir = tmp_path / "q"
    _quarantine(qdir, "a", T0 - timedelta(days=40), b"x" * 100)
    _quarantine(qdir, "b", T0 - timedelta(days=40), None)  # metadata whose file was removed
    _quarantine(qdir, "c", T0 - timedelta(days=2), b"y" * 1000)
    (qdir / ".c.json.tmp").write_text("in progress")  # hidden: never touched
    retention = Retention(qdir, 30 * 86400, max_bytes=1100)

    dry = retention.run(T0, dry_run=True)
    assert sorted(i.id for i, _ in dry.delete) == ["a", "b"]
    assert len(list(qdir.iterdir())) == 6

    retention.run(T0)
    assert sorted(p.name for p in qdir.iterdir()) == [".c.json.tmp", "c", "c.json"]
    purged = events.named("quarantine.purged", dry_run=False)[0]
    assert purged["count"] == 2 and purged["expired"] == 2 and purged["bytes"] > 100
    near_full = events.named("quarantine.near_full")
    assert near_full and near_full[-1]["level"] == "WARNING" and near_full[-1]["percent"] > 80


def test_a_missing_quarantine_is_nothing_to_purge(tmp_path: Path) -> None:
    assert Retention(tmp_path / "none", 86400, None).run(T0).delete == []


# -- the delivery log ----------------------------------------------------------------------


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


# -- settings ------------------------------------------------------------------------------


def test_job_settings_defaults_and_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.update_interval == 4 * HOUR and defaults.definitions_max_age == 48 * HOUR
    assert defaults.rescan_window == 24 * HOUR and defaults.quarantine_retention == 30 * 86400
    assert defaults.quarantine_max_bytes is None
    assert defaults.update_argv == ["freshclam", "--config-file=/etc/clamav/freshclam.conf"]
    monkeypatch.setenv("WATCHER_UPDATE_INTERVAL", "90m")
    monkeypatch.setenv("WATCHER_QUARANTINE_MAX_BYTES", "100M")
    monkeypatch.setenv("WATCHER_UPDATE_COMMAND", "freshclam --config-file='/etc/my conf'")
    s = load_settings()
    assert s.update_interval == 5400 and s.quarantine_max_bytes == 100 * 1024 * 1024
    assert s.update_argv == ["freshclam", "--config-file=/etc/my conf"]
    monkeypatch.setenv("WATCHER_UPDATE_COMMAND", "freshclam 'unbalanced")
    with pytest.raises(ConfigError, match="WATCHER_UPDATE_COMMAND"):
        load_settings()


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
    make_settings: Callable[..., Settings], dirs: dict[str, Path], events: Events
) -> None:
    settings = make_settings()
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
    make_settings: Callable[..., Settings], tmp_path: Path, events: Events
) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "local.ndb").write_text("")
    script = tmp_path / "fake-freshclam"
    script.write_text(f"#!/bin/sh\necho x >> {db}/local.ndb\n")  # changes the definitions
    script.chmod(0o755)
    settings = make_settings(definitions_dir=db, update_command=str(script))
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
