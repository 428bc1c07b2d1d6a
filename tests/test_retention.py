"""Quarantine retention: expired items go, then the oldest while over the size cap, each file
with its record; `watcher purge-quarantine` (watcher/jobs/retention.py)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness.daemon import json_records, run_cli_json
from harness.events import Events
from harness.files import plant_quarantine_item
from watcher.jobs.retention import Item, Reason, Retention, plan_purge

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


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


def test_retention_deletes_files_with_their_metadata_and_warns_near_full(
    tmp_path: Path, events: Events
) -> None:
    qdir = tmp_path / "q"
    plant_quarantine_item(qdir, "a", T0 - timedelta(days=40), b"x" * 100)
    plant_quarantine_item(
        qdir, "b", T0 - timedelta(days=40), None
    )  # metadata whose file was removed
    plant_quarantine_item(qdir, "c", T0 - timedelta(days=2), b"y" * 1000)
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


def test_cli_purge_quarantine_dry_run_lists_and_real_run_deletes(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    now = datetime.now(UTC)
    old_at, young_at = now - timedelta(days=31), now - timedelta(days=1)
    qdir = dirs["quarantine"]
    old = plant_quarantine_item(qdir, f"{old_at:%Y%m%dT%H%M%SZ}-old", old_at, b"old bytes", "old")
    young = plant_quarantine_item(
        qdir, f"{young_at:%Y%m%dT%H%M%SZ}-young", young_at, b"young", "young"
    )

    dry = run_cli_json("purge-quarantine", "--dry-run", env=subprocess_env)
    assert dry.returncode == 0
    assert f"would delete {old} (expired" in dry.stdout
    assert young not in dry.stdout
    assert len(list(dirs["quarantine"].iterdir())) == 4

    real = run_cli_json("purge-quarantine", env=subprocess_env)
    assert real.returncode == 0
    purged = json_records(real.stdout)["quarantine.purged"]
    assert purged["count"] == 1 and purged["expired"] == 1 and purged["dry_run"] is False
    assert sorted(p.name for p in dirs["quarantine"].iterdir()) == [young, f"{young}.json"]

    shutil.rmtree(dirs["quarantine"])
    dirs["quarantine"].write_bytes(b"not a directory")
    assert run_cli_json("purge-quarantine", env=subprocess_env).returncode == 2
