"""The shared verdict store: PostgreSQL (psycopg 3), for replicas that share one uploads tree.

Same contract as the SQLite store (watcher/store/__init__.py), so any replica answers any
file's verdict. What holds, and how:

- **Records and their events in one transaction.** `record` upserts the records and inserts
  the outbox rows in one transaction; PostgreSQL's commit is durable (synchronous_commit on)
  before the claims it settles are dropped (watcher/recording.py).
- **One webhook sender across replicas.** `lock_sender` takes a session-level advisory lock
  (`pg_try_advisory_lock`) on a connection of its own, kept open: the holder sends, the others
  keep asking. The lock goes with the holder's session: at once when its process dies (the
  kernel closes its socket), within about 25 s (TCP keepalives, set for that session) when its
  host vanishes. `lock_sender` is asked before every round and checks the session is alive,
  so a holder whose session broke (the database restarted) takes the lock again or stops
  sending. Delivery stays at least once, exactly as with SQLite: an event sent but not yet
  marked delivered when its sender dies is sent again by the next one, with the same id.
- **A database that is down loses nothing.** Every failure that may pass (connection refused
  or lost, a timeout, the server shutting down, a serialization conflict, a read-only
  standby) raises `StoreUnavailable`: the committer keeps the claims and retries each second,
  the webhook sender retries its round; `store.unavailable` is logged once per outage and
  `/readyz` fails its `verdict_store` check until a write goes through (`store.available`).
  The daemon starts while the database is down, and creates the schema when it answers.
- **Nothing waits forever.** Each connection has `connect_timeout`, `statement_timeout` and
  `lock_timeout` (WATCHER_DATABASE_TIMEOUT_S) and TCP keepalives; and because a frozen server
  on a live host answers TCP but never the query, a watchdog shuts down the socket of any
  operation that runs past twice that, which ends the operation with an error.
- **Secret.** The URL's password is in the connection parameters only: every message that
  leaves this module has it (and the URL) replaced by ``***``.

- **Waiters on every replica.** Each commit NOTIFYs the records' ids; a listener on every
  replica hands them to the recorder's listeners (`subscribe`), so a `?wait` held by one
  replica answers when another decides the file, and the sender wakes at once.

Connections: a small pool (POOL_SIZE), each connection in autocommit with explicit
transactions; a broken one is dropped and the next operation connects again. Paths are stored
as bytea (an upload's name need not be UTF-8), times as unix seconds (double precision).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from watcher.errors import ConfigError, StoreUnavailable
from watcher.logs import emit
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

SCHEMA_VERSION = 1
POOL_SIZE = 6  # the committer, the webhook sender, the jobs, the HTTP pool's lookups
# Advisory lock keys (64-bit): the webhook sender, and the schema's creation.
SENDER_LOCK = 0x7761746368657201  # "watcher" + 1
SCHEMA_LOCK = 0x7761746368657202
WATCHDOG_TICK_S = 0.5
CHANNEL = "watcher_verdicts"  # NOTIFY'd with each committed record's id
LISTEN_TICK_S = 1.0  # how soon the listener sees that the store is closing
LISTEN_BATCH = 500
_WRONG_DATA = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS watcher_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS watcher_verdicts (
    id TEXT PRIMARY KEY,
    path BYTEA NOT NULL,
    verdict TEXT NOT NULL,
    decided_at DOUBLE PRECISION NOT NULL,
    sha256 TEXT,
    size BIGINT,
    signature TEXT,
    reason TEXT,
    cause TEXT,
    definitions TEXT,
    claimed_at DOUBLE PRECISION,
    location BYTEA,
    late_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS watcher_verdicts_by_path ON watcher_verdicts (path, decided_at);
CREATE INDEX IF NOT EXISTS watcher_verdicts_by_sha256 ON watcher_verdicts (sha256, decided_at);
CREATE INDEX IF NOT EXISTS watcher_verdicts_by_time ON watcher_verdicts (decided_at);
CREATE TABLE IF NOT EXISTS watcher_outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    next_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    dead_at DOUBLE PRECISION,
    UNIQUE (key, target)
);
CREATE INDEX IF NOT EXISTS watcher_outbox_due ON watcher_outbox (target, dead_at, next_at);
"""
_UPSERT = upsert_sql("watcher_verdicts", "%s")
_ENQUEUE = """
INSERT INTO watcher_outbox (key, target, body, created_at, next_at) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (key, target) DO NOTHING
"""
_NOTIFY = "SELECT pg_notify(%s, id) FROM unnest(%s::text[]) AS id"  # sent at the commit

Conn = psycopg.Connection[tuple[Any, ...]]


class PostgresStore:
    def __init__(self, url: str, timeout_s: float = 10.0, pool_size: int = POOL_SIZE) -> None:
        self._redact = Redactor(url)
        self._params = _params(url, timeout_s)
        self.timeout_s = timeout_s
        self.health = StoreHealth("postgresql")
        self._watchdog = Watchdog(2 * timeout_s)
        self._pool_size = pool_size
        self._cond = threading.Condition()
        self._idle: list[Conn] = []
        self._count = 0  # connections open or being opened
        self._closed = True
        self._schema_ready = False
        self._sender_lock = threading.Lock()
        self._sender: Conn | None = None
        self._sender_holds = False
        self._listener: threading.Thread | None = None
        self._write_failed = False  # the outage (if any) was met by a write

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Connects and creates the schema; a database that is down is not an error here
        (`store.unavailable`): the first operation that reaches it creates the schema."""
        self._closed = False
        self._watchdog.start()
        with contextlib.suppress(StoreUnavailable), self._connection():
            pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        self.unlock_sender()
        if self._listener is not None:  # it sees `_closed` within LISTEN_TICK_S
            self._listener.join(timeout=2 * LISTEN_TICK_S + self.timeout_s)
            self._listener = None
        for conn in idle:
            conn.close()
        self._watchdog.stop()

    def problem(self) -> str | None:
        return self.health.problem()

    def subscribe(self, callback: Callable[[VerdictRecord], None]) -> None:
        """Hand every record any replica commits (this one's too) to `callback`, on a thread
        of the store's: a `?wait` held by one replica answers as soon as another decides the
        file. A notification missed while the listener reconnects only delays a waiter until
        its deadline, where it looks the file up again."""
        self._listener = threading.Thread(
            target=self._listen, args=(callback,), name="watcher-db-listen", daemon=True
        )
        self._listener.start()

    def _listen(self, callback: Callable[[VerdictRecord], None]) -> None:
        conn: Conn | None = None
        while not self._closed:
            try:
                if conn is None:
                    conn = psycopg.connect(**self._sender_params())
                    conn.execute(f"LISTEN {CHANNEL}")
                ids = [n.payload for n in conn.notifies(timeout=LISTEN_TICK_S, stop_after=1)]
                ids += [n.payload for n in conn.notifies(timeout=0, stop_after=LISTEN_BATCH)]
                for record in self._by_ids(ids) if ids else ():
                    callback(record)
            except (psycopg.Error, StoreUnavailable):  # down: the outage is logged elsewhere
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(LISTEN_TICK_S)
            except Exception:  # a listener's bug must not end the thread
                emit("listener.error", exception=True)
        if conn is not None:
            conn.close()

    def _by_ids(self, ids: list[str]) -> list[VerdictRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM watcher_verdicts WHERE id = ANY(%s)",  # noqa: S608
                (ids,),
            ).fetchall()
        return [from_row(row) for row in rows]

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> Conn:
        conn = psycopg.connect(**self._params)
        if not self._schema_ready:
            try:
                self._create_schema(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _create_schema(self, conn: Conn) -> None:
        # Two replicas starting together: the lock makes one create, the other find it.
        with self._watchdog.watch(conn), conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(_SCHEMA)
            row = conn.execute("SELECT max(version) FROM watcher_schema").fetchone()
            version = None if row is None else row[0]
            if version is None:
                conn.execute("INSERT INTO watcher_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the verdict store's schema is version {version}, newer than this "
                    f"watcher's {SCHEMA_VERSION}: upgrade watcher"
                )
        self._schema_ready = True

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Conn]:
        """A pooled connection for one operation; its failures as StoreUnavailable.

        An outage that a write met ends with a write that goes through (the committer's
        retries come each second): reads may go on where writes cannot (a table locked, a
        standby that turned read-only), and must not make it look over."""
        try:
            conn = self._checkout()
            try:
                with self._guard(), self._watchdog.watch(conn):
                    yield conn
            except BaseException:
                if conn.broken:  # the server went away: its other sessions went with it
                    self._drop_idle()
                self._checkin(conn, keep=not conn.broken and not conn.closed)
                raise
        except StoreUnavailable as err:
            self._write_failed = self._write_failed or write
            self.health.failed(_reason(err))
            raise
        self._checkin(conn, keep=True)
        if write or not self._write_failed:
            self._write_failed = False
            self.health.succeeded()

    def _checkout(self) -> Conn:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise StoreUnavailable("the verdict store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._pool_size:
                    self._count += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable("verdict store: every connection is busy")
                self._cond.wait(left)
        try:
            with self._guard():
                return self._connect()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _drop_idle(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def _checkin(self, conn: Conn, keep: bool) -> None:
        with self._cond:
            if keep and not self._closed and conn.info.transaction_status == _IDLE:
                self._idle.append(conn)
                self._cond.notify()
                return
            self._count -= 1
            self._cond.notify()
        conn.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """psycopg's errors translated once: wrong data stays itself (it would fail again),
        anything else may pass (StoreUnavailable); messages without the password."""
        try:
            yield
        except _WRONG_DATA as err:
            raise type(err)(self._redact(str(err))) from None
        except psycopg.Error as err:
            reason = self._redact(f"{type(err).__name__}: {err}".strip())
            raise StoreUnavailable(f"verdict store: {reason}") from None

    # -- verdicts -----------------------------------------------------------------------

    def record(
        self, records: Sequence[VerdictRecord], events: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        if not records and not events:
            return
        now = time.time()
        with self._connection(write=True) as conn, conn.transaction(), conn.cursor() as cur:
            if records:
                cur.executemany(_UPSERT, [to_row(r) for r in records])
                cur.execute(_NOTIFY, (CHANNEL, [to_row(r)[0] for r in records]))
            if events:
                cur.executemany(_ENQUEUE, [(k, t, b, now, now) for k, t, b in events])

    def by_path(self, path: str) -> VerdictRecord | None:
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM watcher_verdicts WHERE path = %s "  # noqa: S608
                "ORDER BY decided_at DESC LIMIT 1",
                (os.fsencode(path),),
            ).fetchone()
        return None if row is None else from_row(row)

    def by_sha256(self, sha256: str, limit: int = 100) -> list[VerdictRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM watcher_verdicts WHERE sha256 = %s "  # noqa: S608
                "ORDER BY decided_at DESC LIMIT %s",
                (sha256, limit),
            ).fetchall()
        return [from_row(row) for row in rows]

    def mark_late(
        self, path: str, location: str, sha256: str | None, update: VerdictRecord
    ) -> VerdictRecord:
        with self._connection(write=True) as conn, conn.transaction():
            row = conn.execute(
                f"SELECT {COLUMNS} FROM watcher_verdicts WHERE path = %s "  # noqa: S608
                "AND location = %s AND (sha256 = %s OR %s::text IS NULL) "
                "ORDER BY decided_at DESC LIMIT 1 FOR UPDATE",
                (os.fsencode(path), os.fsencode(location), sha256, sha256),
            ).fetchone()
            merged = merge_late(None if row is None else from_row(row), update)
            conn.execute(_UPSERT, to_row(merged))
            conn.execute(_NOTIFY, (CHANNEL, [to_row(merged)[0]]))
        return merged

    def prune(self, older_than: float, max_records: int) -> int:
        with self._connection(write=True) as conn, conn.transaction():
            deleted = conn.execute(
                "DELETE FROM watcher_verdicts WHERE decided_at < %s", (older_than,)
            ).rowcount
            deleted += conn.execute(
                "DELETE FROM watcher_verdicts WHERE id IN (SELECT id FROM watcher_verdicts "
                "ORDER BY decided_at DESC OFFSET %s)",
                (max_records,),
            ).rowcount
            conn.execute("DELETE FROM watcher_outbox WHERE created_at < %s", (older_than,))
            conn.execute(  # a receiver gone for very long: the oldest go
                "DELETE FROM watcher_outbox WHERE id IN (SELECT id FROM watcher_outbox "
                "ORDER BY id DESC OFFSET %s)",
                (max_records,),
            )
        return int(deleted)

    # -- the outbox ---------------------------------------------------------------------

    def lock_sender(self) -> bool:
        """True while this process holds the sender's advisory lock: asked before each of
        the sender's rounds, it checks the lock's session is alive (the database may have
        restarted since), and takes the lock again when it is free."""
        with self._sender_lock:
            conn = self._sender
            try:
                with self._guard():
                    if conn is None or conn.broken or conn.closed:
                        self._sender_holds = False
                        conn = self._sender = psycopg.connect(**self._sender_params())
                    with self._watchdog.watch(conn):
                        if self._sender_holds:
                            conn.execute("SELECT 1")
                        else:
                            row = conn.execute(
                                "SELECT pg_try_advisory_lock(%s)", (SENDER_LOCK,)
                            ).fetchone()
                            self._sender_holds = bool(row and row[0])
            except StoreUnavailable as err:
                self.health.failed(_reason(err))
                self._sender_holds = False
                if self._sender is not None:
                    self._sender.close()
                    self._sender = None
                raise
            return self._sender_holds

    def _sender_params(self) -> dict[str, Any]:
        # The server drops a vanished holder's session (and its lock) after ~25 s of silence.
        options = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
        return {**self._params, "options": f"{self._params.get('options', '')} {options}"}

    def unlock_sender(self) -> None:
        with self._sender_lock:
            conn, self._sender, self._sender_holds = self._sender, None, False
        if conn is not None:
            conn.close()  # the session's advisory lock goes with it

    def due(self, target: str, now: float, limit: int) -> list[OutboxEvent]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT id, key, target, body, attempts, created_at FROM watcher_outbox "
                "WHERE target = %s AND dead_at IS NULL AND next_at <= %s ORDER BY id LIMIT %s",
                (target, now, limit),
            ).fetchall()
        return [OutboxEvent(*row) for row in rows]

    def delivered(self, event_ids: Sequence[int]) -> None:
        with self._connection(write=True) as conn:
            conn.execute("DELETE FROM watcher_outbox WHERE id = ANY(%s)", (list(event_ids),))

    def failed(self, event_id: int, next_at: float, error: str) -> None:
        with self._connection(write=True) as conn:
            conn.execute(
                "UPDATE watcher_outbox SET attempts = attempts + 1, next_at = %s, "
                "last_error = %s WHERE id = %s",
                (next_at, _clean(error[:500]), event_id),
            )

    def dead(self, event_id: int, now: float, error: str) -> None:
        with self._connection(write=True) as conn:
            conn.execute(
                "UPDATE watcher_outbox SET attempts = attempts + 1, dead_at = %s, "
                "last_error = %s WHERE id = %s",
                (now, _clean(error[:500]), event_id),
            )

    def next_due_at(self, target: str) -> float | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT MIN(next_at) FROM watcher_outbox WHERE target = %s AND dead_at IS NULL",
                (target,),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def outbox_counts(self) -> tuple[int, int]:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE dead_at IS NULL), "
                "count(*) FILTER (WHERE dead_at IS NOT NULL) FROM watcher_outbox"
            ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))


_IDLE = psycopg.pq.TransactionStatus.IDLE


def _params(url: str, timeout_s: float) -> dict[str, Any]:
    """The connection's parameters: the URL's, with our bounds added to its `options`."""
    try:
        params: dict[str, Any] = conninfo_to_dict(url)
    except psycopg.Error:
        raise ConfigError("WATCHER_DATABASE_URL: not a valid PostgreSQL URL") from None
    timeout_ms = int(timeout_s * 1000)
    bounds = (
        f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms} "
        f"-c idle_in_transaction_session_timeout={6 * timeout_ms}"
    )
    params["options"] = f"{params.get('options', '')} {bounds}".strip()
    params.setdefault("connect_timeout", max(2, round(timeout_s)))
    params.setdefault("application_name", "watcher")
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 10)
    params.setdefault("keepalives_interval", 5)
    params.setdefault("keepalives_count", 3)
    params["autocommit"] = True  # transactions are explicit: conn.transaction()
    return params


class Redactor:
    """Replaces the URL's password (as written, and decoded) and the URL itself by ``***``."""

    def __init__(self, url: str) -> None:
        secrets = {url}
        with contextlib.suppress(ValueError):
            raw = urlsplit(url).password
            if raw:
                secrets |= {raw, unquote(raw)}
        with contextlib.suppress(psycopg.Error):
            password = conninfo_to_dict(url).get("password")
            if password:
                secrets.add(str(password))
        self._secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class Watchdog:
    """Ends any operation on a connection that runs past `limit_s` by shutting its socket
    down (the waiting call then fails: connection lost). For a server that accepts bytes but
    never answers (frozen), where the server's own statement_timeout cannot fire."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Conn, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="watcher-db-watchdog")
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextmanager
    def watch(self, conn: Conn) -> Iterator[None]:
        key = id(conn)
        with self._lock:
            self._watched[key] = (conn, time.monotonic() + self.limit_s)
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(WATCHDOG_TICK_S):
            now = time.monotonic()
            with self._lock:  # under the lock: a connection handed back is not cut
                for key, (conn, deadline) in list(self._watched.items()):
                    if now > deadline:
                        del self._watched[key]
                        _shut_down(conn)


def _shut_down(conn: Conn) -> None:
    with contextlib.suppress(OSError, psycopg.Error):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


def _reason(err: StoreUnavailable) -> str:
    return str(err).removeprefix("verdict store: ")


def _clean(text: str) -> str:
    """PostgreSQL text holds no NUL."""
    return text.replace("\0", "\\0")
