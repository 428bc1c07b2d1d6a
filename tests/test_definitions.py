"""Definitions freshness: their age from the version clamd reports (or their files), stale
and fresh again told once per change (watcher/definitions.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness.events import Events
from watcher.clamav import scanner_from_settings
from watcher.definitions import (
    DefinitionsState,
    Freshness,
    LoadedDefinitions,
    StalenessTracker,
    definitions_age_s,
    fingerprint,
    newest_file_time,
)
from watcher.jobs import Jobs
from watcher.settings import Settings

MakeSettings = Callable[..., Settings]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0


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
