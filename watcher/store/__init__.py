"""The verdict store: every final outcome, durable, and the outbox of webhook events beside it.

One record per settled file (`VerdictRecord`), keyed by the claim id; a late detection by the
rescan updates it. Outbox rows (`OutboxEvent`) are written in the same transaction as the
records they announce, so an event is never lost nor made for a verdict that was not kept.

`VerdictStore` is the narrow interface the daemon, the API, the jobs and the webhook sender
use; `SqliteStore` (watcher/store/sqlite.py, stdlib sqlite3 in WAL mode, in
WATCHER_STATE_DIR) is the embedded one, `PostgresStore` (watcher/store/postgres.py, selected
by WATCHER_DATABASE_URL) the one replicas share. Their SQL is the same but for placeholders
and the DDL's types. What is durable when (watcher/recording.py): a delivered file's staging
claim is dropped only after its record is committed, so a SIGKILL at any moment leaves
either the record or a claim whose journal holds the verdict, which the next start records.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Protocol

STORE_FILE = "verdicts.sqlite3"


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """What became of one file. `verdict` is the outcome's verdict word (verdict.Outcome)."""

    id: str  # the claim id; a fresh id for an entry never claimed (rejected)
    path: str  # relative to uploads (a str that may hold surrogates: any file name)
    verdict: str  # clean, infected, unscannable, unscanned, allowlisted, rejected
    decided_at: float  # unix time the verdict was reached
    sha256: str | None = None
    size: int | None = None
    signature: str | None = None
    reason: str | None = None
    cause: str | None = None
    definitions: str | None = None  # clamd's VERSION reply at the time
    claimed_at: float | None = None
    location: str | None = None  # "processed/<path>", "quarantine/<id>", "held/<name>", ...
    late_at: float | None = None  # when the rescan found it infected after delivery

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy of every value is most of a note's cost,
        # and every field here is a str, a number or None.
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VerdictRecord:
        return cls(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})

    def with_location(self, location: str | None) -> VerdictRecord:
        return replace(self, location=location)

    @property
    def changed_at(self) -> float:
        """When this record last changed: a late detection is newer than the scan."""
        return max(self.decided_at, self.late_at or 0.0)

    def public(self) -> dict[str, Any]:
        """The record as the API and the webhooks show it (the API's file status, and more)."""
        return {
            "path": self.path,
            "state": "clean" if self.verdict == "allowlisted" else self.verdict,
            "location": self.location,
            "sha256": self.sha256,
            "size": self.size,
            "signature": self.signature,
            "reason": self.reason,
            "cause": self.cause,
            "definitions": self.definitions,
            "scanned_at": None
            if self.verdict in ("rejected", "unscanned")
            else iso(self.decided_at),
            "allowlisted": self.verdict == "allowlisted",
            "detected_late_at": iso(self.late_at) if self.late_at else None,
        }


_RECORD_FIELDS = tuple(f.name for f in fields(VerdictRecord))


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A webhook event waiting to be delivered to one target (a configured URL)."""

    id: int
    key: str  # the idempotency key: the same for every attempt, to every target
    target: str  # target_id(url)
    body: str  # JSON, as sent (signed at each attempt with its own timestamp)
    attempts: int
    created_at: float


class VerdictStore(Protocol):
    """Thread-safe. Writes are transactions: all of a call's rows, or none; a write that may
    succeed later raises errors.StoreUnavailable (anything else will fail again)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def problem(self) -> str | None:
        """None while the store takes writes; else why the last one failed (readiness)."""

    def subscribe(self, callback: Callable[[VerdictRecord], None]) -> None:
        """Records other processes commit are handed to `callback` where the backend can
        tell (PostgreSQL: LISTEN/NOTIFY); a no-op where it cannot (SQLite)."""

    def record(
        self, records: Sequence[VerdictRecord], events: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        """Insert (or replace, by id) records, and enqueue (key, target, body) outbox events;
        an event whose (key, target) is already there is left as it is (idempotent)."""

    def by_path(self, path: str) -> VerdictRecord | None:
        """The newest record of a path."""

    def by_sha256(self, sha256: str, limit: int = 100) -> list[VerdictRecord]:
        """Records of these bytes, newest first."""

    def mark_late(
        self, path: str, location: str, sha256: str | None, update: VerdictRecord
    ) -> VerdictRecord:
        """A delivered file found infected by the rescan: the newest record of `path` at
        `location` (with those bytes) takes `update`'s verdict, signature, definitions,
        location and late time; `update` itself is inserted when there is none."""

    def prune(self, older_than: float, max_records: int) -> int:
        """Delete records decided before `older_than`, then the oldest beyond `max_records`;
        the same for outbox events (dead letters, or events for a URL no longer configured).
        Returns the records deleted."""

    # -- the outbox ----------------------------------------------------------------------

    def lock_sender(self) -> bool:
        """Become the one process that sends the outbox (a second daemon on the same store
        waits); False while another holds it. Released by `unlock_sender`, or by the
        holder's death (SQLite: an flock; a server database: an advisory lock)."""

    def unlock_sender(self) -> None: ...

    def due(self, target: str, now: float, limit: int) -> list[OutboxEvent]:
        """Events of `target` due at `now`, oldest first."""

    def delivered(self, event_ids: Sequence[int]) -> None:
        """Delivered events leave the outbox (not fsynced: a crash may send them again)."""

    def failed(self, event_id: int, next_at: float, error: str) -> None: ...
    def dead(self, event_id: int, now: float, error: str) -> None: ...
    def next_due_at(self, target: str) -> float | None:
        """The earliest time an undelivered, live event of `target` is due (None: none)."""

    def outbox_counts(self) -> tuple[int, int]:
        """(events waiting, dead letters)."""


def merge_late(delivered: VerdictRecord | None, late: VerdictRecord) -> VerdictRecord:
    """The delivered file's record after the rescan found it infected (`mark_late`): its
    verdict, signature, definitions, location and late time are the late detection's."""
    if delivered is None:
        return late
    return replace(
        delivered,
        verdict=late.verdict,
        signature=late.signature,
        definitions=late.definitions,
        location=late.location,
        late_at=late.late_at,
    )


def target_id(url: str) -> str:
    """A stable name for a webhook URL (the URL may hold a token: it is not stored)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def location_of(dest: str | os.PathLike[str] | None, processed: str, quarantine: str) -> str | None:
    """``processed/<relative path>`` or ``quarantine/<id>`` for a destination path."""
    if dest is None:
        return None
    dest = os.fspath(dest)
    for root, name in ((processed, "processed"), (quarantine, "quarantine")):
        if dest.startswith(root.rstrip(os.sep) + os.sep):
            return f"{name}/{dest[len(root.rstrip(os.sep)) + 1 :]}"
    return None


# -- the records' columns, shared by the SQLite and PostgreSQL stores ------------------------

COLUMNS = (
    "id, path, verdict, decided_at, sha256, size, signature, reason, cause, definitions, "
    "claimed_at, location, late_at"
)


def upsert_sql(table: str, placeholder: str) -> str:
    """The record's insert-or-replace, as both backends run it (`?` or `%s` placeholders).

    >>> upsert_sql("t", "?").splitlines()[1]
    'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'
    """
    names = [name.strip() for name in COLUMNS.split(",")]
    values = ", ".join([placeholder] * len(names))
    updates = ", ".join(f"{name} = excluded.{name}" for name in names[1:])
    return (
        f"INSERT INTO {table} ({COLUMNS})\nVALUES ({values})\n"
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )


def to_row(r: VerdictRecord) -> tuple[Any, ...]:
    """Paths (and locations, which hold them) as bytes; other text escaped where it holds
    something UTF-8 cannot (a name's undecodable bytes, quoted in a reason)."""
    location = None if r.location is None else os.fsencode(r.location)
    return (
        _text(r.id), os.fsencode(r.path), _text(r.verdict), r.decided_at, _text(r.sha256),
        r.size, _text(r.signature), _text(r.reason), _text(r.cause), _text(r.definitions),
        r.claimed_at, location, r.late_at,
    )  # fmt: skip


def from_row(row: tuple[Any, ...]) -> VerdictRecord:
    values = list(row)
    values[1] = os.fsdecode(bytes(values[1]))
    if values[11] is not None:
        values[11] = os.fsdecode(bytes(values[11]))
    return VerdictRecord(*values)


def _text(value: str | None) -> str | None:
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
