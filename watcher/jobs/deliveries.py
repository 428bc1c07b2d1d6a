"""The delivery log: one JSON line per file delivered clean, so a rescan need not walk processed.

``<WATCHER_STATE_DIR>/deliveries.jsonl``, append-only; entries older than the rescan window are
pruned by rewriting the file atomically. Every access holds an flock on ``deliveries.lock``, so
the daemon and a `watcher update-definitions` run can share it. Appends are not fsynced: a crash
may lose the last few entries (those files are then not rescanned), and a torn last line is
skipped when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from watcher.fsops import relative_to
from watcher.pipeline import Result
from watcher.verdict import Outcome

LOG_NAME = "deliveries.jsonl"
_encode_line = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per line


@dataclass(frozen=True)
class Delivery:
    at: datetime
    dest: str  # relative to the processed directory
    rel: str  # the upload's relative path
    size: int | None
    sha256: str | None
    dev: int  # identity of the delivered file: a rescan skips a name that now holds another
    ino: int

    def to_line(self) -> bytes:
        body = {  # not dataclasses.asdict: it deep-copies every field, once per delivery
            "at": self.at.isoformat(),
            "dest": self.dest,
            "rel": self.rel,
            "size": self.size,
            "sha256": self.sha256,
            "dev": self.dev,
            "ino": self.ino,
        }
        return _encode_line(body).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Delivery | None:
        try:
            body = json.loads(line)
            return cls(**(body | {"at": datetime.fromisoformat(body["at"])}))
        except (ValueError, TypeError, KeyError):
            return None  # a line torn by a crash


# Lines gathered before they are written: one locked write per batch instead of one per file
# (the lock, stat and write showed as a twelfth of the daemon's time per file).
GATHER_S = 0.05
GATHER_MAX = 256


class DeliveryLog:
    def __init__(self, state_dir: Path, processed_dir: Path) -> None:
        self.path = state_dir / LOG_NAME
        self.processed_dir = processed_dir
        self._lock_path = state_dir / "deliveries.lock"
        self._mutex = threading.Lock()  # flock is per open file, not per thread
        self._lock_fd = -1
        self._log_fd = -1
        self._log_identity = (-1, -1)
        self._pending: list[bytes] = []
        self._gathering = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closing = False

    def record(self, result: Result) -> None:
        """Daemon listener: note each clean delivery (with the identity of the file delivered)."""
        if result.outcome is not Outcome.CLEAN or result.dest is None:
            return
        try:
            st = os.lstat(result.dest)
        except FileNotFoundError:
            return  # already taken away by the app: nothing left to rescan
        dest = relative_to(result.dest, self.processed_dir) or os.path.relpath(
            result.dest, self.processed_dir
        )
        at = datetime.now(UTC)
        entry = Delivery(at, dest, result.rel, result.size, result.sha256, st.st_dev, st.st_ino)
        self.append(entry)

    def append(self, entry: Delivery) -> None:
        """Queue one line; it is written within GATHER_S (at once by `flush`)."""
        line = entry.to_line()
        with self._gathering:
            self._pending.append(line)
            if self._writer is None and not self._closing:
                self._writer = threading.Thread(
                    target=self._write_gathered, name="watcher-delivery-log", daemon=True
                )
                self._writer.start()
            if len(self._pending) == 1 or len(self._pending) >= GATHER_MAX:
                self._gathering.notify()

    def flush(self) -> None:
        with self._gathering:
            lines, self._pending = self._pending, []
        if lines:
            self._write(b"".join(lines))

    def _write_gathered(self) -> None:
        while True:
            with self._gathering:
                while not self._pending and not self._closing:
                    self._gathering.wait()
                if self._closing and not self._pending:
                    return
                if len(self._pending) < GATHER_MAX and not self._closing:
                    self._gathering.wait(GATHER_S)
            self.flush()

    def _write(self, data: bytes) -> None:
        with self._locked():
            # Kept open across appends; reopened when a prune (ours or another process's)
            # replaced the file, which it only does under the same lock.
            try:
                current = os.stat(self.path)
                replaced = (current.st_dev, current.st_ino) != self._log_identity
            except FileNotFoundError:
                replaced = True
            if replaced:
                self._close_log()
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                self._log_fd = os.open(self.path, flags, 0o600)
                opened = os.fstat(self._log_fd)
                self._log_identity = (opened.st_dev, opened.st_ino)
            os.write(self._log_fd, data)

    def close(self) -> None:
        with self._gathering:
            self._closing = True
            self._gathering.notify()
        if self._writer is not None:
            self._writer.join()
        self.flush()
        with self._mutex:
            self._close_log()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _close_log(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
            self._log_identity = (-1, -1)

    def entries(self, since: datetime) -> list[Delivery]:
        """Deliveries at or after `since`, oldest first."""
        self.flush()
        with self._locked():
            return [e for e in self._read() if e.at >= since]

    def prune(self, now: datetime, window_s: float) -> int:
        """Drop entries older than the window; returns how many went."""
        cutoff = now - timedelta(seconds=window_s)
        self.flush()
        with self._locked():
            entries = list(self._read())
            keep = [e for e in entries if e.at >= cutoff]
            if len(keep) == len(entries):
                return 0
            tmp = self.path.with_name(f".{LOG_NAME}.tmp")
            tmp.write_bytes(b"".join(e.to_line() for e in keep))
            os.replace(tmp, self.path)
            return len(entries) - len(keep)

    def _read(self) -> Iterator[Delivery]:
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    entry = Delivery.from_line(line)
                    if entry is not None:
                        yield entry
        except FileNotFoundError:
            return

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._lock_fd < 0:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                self._lock_fd = os.open(self._lock_path, flags, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
