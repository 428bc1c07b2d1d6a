"""Quarantine retention: expire old items, then keep the quarantine under its size cap.

An item is ``<id>`` (the bytes) plus ``<id>.json`` (its metadata). Deleted: items detected more
than WATCHER_QUARANTINE_RETENTION ago, then, while the rest is over WATCHER_QUARANTINE_MAX_BYTES,
the oldest first. Data goes before its metadata, so data is never left without it. Hidden names
(deliveries in progress) and subdirectories are never touched.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from watcher.logs import emit

NEAR_FULL_RATIO = 0.8
# Metadata is written just before its file arrives: a young record without data is in flight.
IN_FLIGHT_S = 60.0


class Reason(enum.StrEnum):
    EXPIRED = "expired"
    OVER_CAP = "over_cap"


@dataclass(frozen=True)
class Item:
    id: str
    detected_at: datetime
    size_bytes: int  # data and metadata together
    data: Path | None = None
    meta: Path | None = None


@dataclass(frozen=True)
class Plan:
    delete: list[tuple[Item, Reason]] = field(default_factory=list)
    total_bytes: int = 0
    remaining_bytes: int = 0

    @property
    def deleted_bytes(self) -> int:
        return self.total_bytes - self.remaining_bytes


def plan_purge(items: list[Item], now: datetime, retention_s: float, max_bytes: int | None) -> Plan:
    """What to delete, and why; pure, so it is tested with a passed clock.

    >>> t = datetime(2026, 1, 31, tzinfo=UTC)
    >>> old, new = Item("a", t - timedelta(days=40), 10), Item("b", t, 10)
    >>> [(i.id, r.value) for i, r in plan_purge([old, new], t, 30 * 86400, None).delete]
    [('a', 'expired')]
    """
    cutoff = now - timedelta(seconds=retention_s)
    total = sum(i.size_bytes for i in items)
    delete: list[tuple[Item, Reason]] = []
    kept: list[Item] = []
    for item in sorted(items, key=lambda i: (i.detected_at, i.id)):
        if item.detected_at < cutoff:
            delete.append((item, Reason.EXPIRED))
        else:
            kept.append(item)
    remaining = sum(i.size_bytes for i in kept)
    for item in kept:
        if max_bytes is None or remaining <= max_bytes:
            break
        if item.data is None and (now - item.detected_at).total_seconds() < IN_FLIGHT_S:
            continue
        delete.append((item, Reason.OVER_CAP))
        remaining -= item.size_bytes
    return Plan(delete, total, remaining)


def list_items(quarantine_dir: Path) -> list[Item]:
    """Every quarantined item, with its detection time (metadata, else the files' times)."""
    found: dict[str, dict[str, os.DirEntry[str]]] = {}
    with os.scandir(quarantine_dir) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            kind = "meta" if entry.name.endswith(".json") else "data"
            found.setdefault(entry.name.removesuffix(".json"), {})[kind] = entry
    return [_item(item_id, parts) for item_id, parts in found.items()]


def _item(item_id: str, parts: dict[str, os.DirEntry[str]]) -> Item:
    sizes = {k: e.stat(follow_symlinks=False) for k, e in parts.items()}
    detected_at = None
    if "meta" in parts:
        detected_at = _detected_at(Path(parts["meta"].path))
        detected_at = detected_at or datetime.fromtimestamp(sizes["meta"].st_mtime, UTC)
    else:  # the data's mtime is the upload's; its ctime changed when it was quarantined
        detected_at = datetime.fromtimestamp(sizes["data"].st_ctime, UTC)
    return Item(
        item_id,
        detected_at,
        sum(s.st_size for s in sizes.values() if stat.S_ISREG(s.st_mode)),
        Path(parts["data"].path) if "data" in parts else None,
        Path(parts["meta"].path) if "meta" in parts else None,
    )


def _detected_at(meta: Path) -> datetime | None:
    try:
        value = datetime.fromisoformat(json.loads(meta.read_bytes())["detected_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Retention:
    def __init__(self, quarantine_dir: Path, retention_s: float, max_bytes: int | None) -> None:
        self.quarantine_dir = quarantine_dir
        self.retention_s = retention_s
        self.max_bytes = max_bytes

    def run(self, now: datetime, dry_run: bool = False) -> Plan:
        """Purge (or, with dry_run, only plan); logs `quarantine.purged` and `near_full`."""
        try:
            items = list_items(self.quarantine_dir)
        except FileNotFoundError:
            items = []  # nothing quarantined yet
        plan = plan_purge(items, now, self.retention_s, self.max_bytes)
        if not dry_run:
            for item, _reason in plan.delete:
                for path in (item.data, item.meta):  # data first: never data without metadata
                    if path is not None:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
        reasons = [r for _, r in plan.delete]
        emit(
            "quarantine.purged",
            count=len(plan.delete),
            bytes=plan.deleted_bytes,
            expired=reasons.count(Reason.EXPIRED),
            over_cap=reasons.count(Reason.OVER_CAP),
            remaining_bytes=plan.remaining_bytes,
            dry_run=dry_run,
        )
        if self.max_bytes and plan.remaining_bytes > NEAR_FULL_RATIO * self.max_bytes:
            emit(
                "quarantine.near_full",
                bytes=plan.remaining_bytes,
                max_bytes=self.max_bytes,
                percent=round(100 * plan.remaining_bytes / self.max_bytes, 1),
            )
        return plan
