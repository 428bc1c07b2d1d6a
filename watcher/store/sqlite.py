"""The embedded verdict store: one SQLite file in WATCHER_STATE_DIR, WAL mode.

Writes go through one connection under a lock (the committer's batches, the rescan, the webhook
sender); reads use a connection per thread, which WAL lets run beside a write. Each write is
committed with ``synchronous=FULL``: the batch's records are on disk before the claims they
settle are dropped (watcher/recording.py). Several processes may share the file (a second
daemon, a CLI command): SQLite locks it, and `busy_timeout` waits out another's write.

Paths are stored as bytes (os.fsencode): an upload's name need not be UTF-8.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from watcher.errors import StoreUnavailable
from watcher.store import (
    COLUMNS,
    OutboxEvent,
    VerdictRecord,
    from_row,
    merge_late,
    to_row,
    upsert_sql,
)
from watcher.store.health import StoreHealth

BUSY_TIMEOUT_MS = 10_000
_WRONG_DATA = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id TEXT PRIMARY KEY,
    path BLOB NOT NULL,
    verdict TEXT NOT NULL,
    decided_at REAL NOT NULL,
    sha256 TEXT,
    size INTEGER,
    signature TEXT,
    reason TEXT,
    cause TEXT,
    definitions TEXT,
    claimed_at REAL,
    location BLOB,
    late_at REAL
);
CREATE INDEX IF NOT EXISTS verdicts_by_path ON verdicts (path, decided_at);
CREATE INDEX IF NOT EXISTS verdicts_by_sha256 ON verdicts (sha256, decided_at);
CREATE INDEX IF NOT EXISTS verdicts_by_time ON verdicts (decided_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    dead_at REAL,
    UNIQUE (key, target)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (target, dead_at, next_at);
"""
_UPSERT = upsert_sql("verdicts", "?")
_ENQUEUE = """
INSERT INTO outbox (key, target, body, created_at, next_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (key, target) DO NOTHING
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._sender_lock_fd = -1
        self.health = StoreHealth("sqlite")

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)  # created private before SQLite opens it (and its -wal, -shm beside it)
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.executescript(_SCHEMA)

    def close(self) -> None:
        self.unlock_sender()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction; `durable`: fsynced at its commit (the outbox's bookkeeping is not:
        a crash may only send an event again, or retry it sooner)."""
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise StoreUnavailable("the verdict store is closed")
            try:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                if isinstance(err, _WRONG_DATA):
                    raise
                # Locked, full, an I/O error, a damaged file: worth another try (or a restore).
                self.health.failed(str(err))
                raise StoreUnavailable(f"verdict store: {err}") from err
        self.health.succeeded()

    def problem(self) -> str | None:
        return self.health.problem()

    def subscribe(self, callback: Callable[[VerdictRecord], None]) -> None:
        """Nothing to do: daemons sharing the file find each other's records at lookup."""

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # -- verdicts -----------------------------------------------------------------------

    def record(
        self, records: Sequence[VerdictRecord], events: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        if not records and not events:
            return
        now = _now()
        with self._write() as conn:
            conn.executemany(_UPSERT, [to_row(r) for r in records])
            conn.executemany(_ENQUEUE, [(k, t, b, now, now) for k, t, b in events])

    def by_path(self, path: str) -> VerdictRecord | None:
        row = (
            self._reader()
            .execute(
                f"SELECT {COLUMNS} FROM verdicts WHERE path = ? "  # noqa: S608 - constants
                "ORDER BY decided_at DESC LIMIT 1",
                (os.fsencode(path),),
            )
            .fetchone()
        )
        return None if row is None else from_row(row)

    def by_sha256(self, sha256: str, limit: int = 100) -> list[VerdictRecord]:
        rows = (
            self._reader()
            .execute(
                f"SELECT {COLUMNS} FROM verdicts WHERE sha256 = ? "  # noqa: S608 - constants
                "ORDER BY decided_at DESC LIMIT ?",
                (sha256, limit),
            )
            .fetchall()
        )
        return [from_row(row) for row in rows]

    def mark_late(
        self, path: str, location: str, sha256: str | None, update: VerdictRecord
    ) -> VerdictRecord:
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM verdicts WHERE path = ? AND location = ? "  # noqa: S608
                "AND (sha256 = ? OR ? IS NULL) ORDER BY decided_at DESC LIMIT 1",
                (os.fsencode(path), os.fsencode(location), sha256, sha256),
            ).fetchone()
            merged = merge_late(None if row is None else from_row(row), update)
            conn.execute(_UPSERT, to_row(merged))
        return merged

    def prune(self, older_than: float, max_records: int) -> int:
        with self._write() as conn:
            deleted = conn.execute(
                "DELETE FROM verdicts WHERE decided_at < ?", (older_than,)
            ).rowcount
            (count,) = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
            if count > max_records:
                deleted += conn.execute(
                    "DELETE FROM verdicts WHERE id IN "
                    "(SELECT id FROM verdicts ORDER BY decided_at LIMIT ?)",
                    (count - max_records,),
                ).rowcount
            conn.execute("DELETE FROM outbox WHERE created_at < ?", (older_than,))
            (events,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if events > max_records:  # a receiver gone for very long: the oldest go
                conn.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                    (events - max_records,),
                )
        return int(deleted)

    # -- the outbox ---------------------------------------------------------------------

    def lock_sender(self) -> bool:
        if self._sender_lock_fd < 0:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self._sender_lock_fd = os.open(self.path.with_name("webhooks.lock"), flags, 0o600)
        try:
            fcntl.flock(self._sender_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock_sender(self) -> None:
        if self._sender_lock_fd >= 0:
            os.close(self._sender_lock_fd)  # the flock goes with it
            self._sender_lock_fd = -1

    def due(self, target: str, now: float, limit: int) -> list[OutboxEvent]:
        rows = (
            self._reader()
            .execute(
                "SELECT id, key, target, body, attempts, created_at FROM outbox "
                "WHERE target = ? AND dead_at IS NULL AND next_at <= ? ORDER BY id LIMIT ?",
                (target, now, limit),
            )
            .fetchall()
        )
        return [OutboxEvent(*row) for row in rows]

    def delivered(self, event_ids: Sequence[int]) -> None:
        with self._write(durable=False) as conn:
            conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in event_ids])

    def failed(self, event_id: int, next_at: float, error: str) -> None:
        with self._write(durable=False) as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, "
                "last_error = ? WHERE id = ?",
                (next_at, error[:500], event_id),
            )

    def dead(self, event_id: int, now: float, error: str) -> None:
        with self._write(durable=False) as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, dead_at = ?, "
                "last_error = ? WHERE id = ?",
                (now, error[:500], event_id),
            )

    def next_due_at(self, target: str) -> float | None:
        (at,) = (
            self._reader()
            .execute(
                "SELECT MIN(next_at) FROM outbox WHERE target = ? AND dead_at IS NULL",
                (target,),
            )
            .fetchone()
        )
        return None if at is None else float(at)

    def outbox_counts(self) -> tuple[int, int]:
        waiting, dead = (
            self._reader()
            .execute(
                "SELECT COALESCE(SUM(CASE WHEN dead_at IS NULL THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN dead_at IS NULL THEN 0 ELSE 1 END), 0) FROM outbox"
            )
            .fetchone()
        )
        return int(waiting), int(dead)


def _now() -> float:
    return time.time()
