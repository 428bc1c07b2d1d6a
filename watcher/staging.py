"""Claims: the filesystem is the journal.

A claim renames an upload into this daemon's private staging directory (on the uploads
filesystem, so the rename is atomic) under a generated name. Before that, one line in an
append-only journal says where it came from; before a delivery step that is not one atomic
rename, another line says where it is going. Whatever data exists in staging after a crash is
redone at the next start (or finished, if its destination already holds it); journal lines
whose data is gone were delivered, or their claim never happened.

The journal is one open file per daemon (a line per claim costs a `write`, where a record file
per claim cost a file creation, ~0.7 ms on a VM's ext4), in segments of about 1 MiB: a segment
is deleted once every claim it announced has been released.

Each daemon has its own directory, locked with flock for its lifetime, so two daemons on one
uploads volume never process the same claim; a dead daemon's directory is adopted.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from watcher.fsops import rename_noreplace

_DATA = ".data"
_SEGMENT = "journal-"
SEGMENT_BYTES = 1024 * 1024


def new_id() -> str:
    """Time-sortable, unique: ``20261128T221500Z-3f9a1c2b7d4e``."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(6)}"


@dataclass
class Claim:
    id: str
    rel: str  # the upload's path relative to the uploads directory (a str; may hold surrogates)
    data: Path
    claimed_at: float
    segment: int = 0
    dest: str | None = None  # noted before a delivery step that is not one atomic rename
    attempts: int = 0  # scans that failed for a passing cause
    errors: int = 0  # unexpected filesystem errors in a row


class Journal:
    """Append-only JSON lines, in segments; thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._fd = -1
        self._segment = 0
        self._size = 0
        self._outstanding: dict[int, int] = {}

    def open(self) -> None:
        with self._lock:
            self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._outstanding.get(self._segment):
                self._path(self._segment).unlink(missing_ok=True)

    def claim(self, claim: Claim) -> None:
        line = {"id": claim.id, "rel": claim.rel, "at": claim.claimed_at}
        with self._lock:
            self._write(line)
            claim.segment = self._segment
            self._outstanding[self._segment] = self._outstanding.get(self._segment, 0) + 1
            if self._size >= SEGMENT_BYTES:
                self._rotate()

    def note(self, claim: Claim, dest: str) -> None:
        with self._lock:
            self._write({"id": claim.id, "dest": dest})

    def forget(self, claim: Claim) -> None:
        """The claim is settled; its segment goes when nothing in it is outstanding."""
        with self._lock:
            left = self._outstanding.get(claim.segment, 0) - 1
            if left > 0 or claim.segment == self._segment:
                self._outstanding[claim.segment] = max(left, 0)
                return
            self._outstanding.pop(claim.segment, None)
            self._path(claim.segment).unlink(missing_ok=True)

    @staticmethod
    def read(directory: Path) -> dict[str, dict[str, Any]]:
        """Every claim announced in a directory's segments, later lines updating earlier ones."""
        entries: dict[str, dict[str, Any]] = {}
        for segment in sorted(directory.glob(f"{_SEGMENT}*")):
            for line in segment.read_bytes().splitlines():
                try:
                    fields = json.loads(line)
                    entries.setdefault(fields["id"], {}).update(fields)
                except (ValueError, KeyError, TypeError):
                    continue  # torn by a crash mid-write: the step it announced never began
        return entries

    def _write(self, fields: dict[str, Any]) -> None:
        line = json.dumps(fields).encode() + b"\n"
        os.write(self._fd, line)
        self._size += len(line)

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            if not self._outstanding.get(self._segment):
                self._outstanding.pop(self._segment, None)
                self._path(self._segment).unlink(missing_ok=True)
        self._segment += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._path(self._segment), flags, 0o600)
        self._size = 0

    def _path(self, segment: int) -> Path:
        return self.dir / f"{_SEGMENT}{segment:06}"


class Staging:
    """This daemon's claim directory under ``<uploads>/.watcher/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / f"d-{os.getpid()}-{secrets.token_hex(4)}"
        self.held_dir = root / "held"
        self.journal = Journal(self.dir)
        self._lock_fd: int | None = None

    def open(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.held_dir.mkdir(mode=0o700, exist_ok=True)
        # Locked under a name recovery ignores, then renamed: another daemon recovering at this
        # moment must never see (and adopt) a `d-*` directory that has no lock yet.
        setting_up = self.root / f"t-{self.dir.name}"
        setting_up.mkdir(mode=0o700)
        self._lock_fd = os.open(setting_up / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(setting_up, self.dir)
        self.journal.open()

    def close(self) -> None:
        """Release our directory; an empty one is removed, a non-empty one is adopted later."""
        if self._lock_fd is None:
            return
        self.journal.close()
        if not any(self.dir.glob(f"*{_DATA}")):
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def claim(self, upload: Path, rel: str) -> Claim | None:
        """Take ``upload`` for ourselves; None if someone else took it first."""
        claim_id = new_id()
        claim = Claim(claim_id, rel, self.dir / f"{claim_id}{_DATA}", time.time())
        self.journal.claim(claim)  # first: data without its journal line would lose its name
        try:
            os.rename(upload, claim.data)
        except FileNotFoundError:
            self.journal.forget(claim)
            return None
        return claim

    def unclaim(self, claim: Claim, uploads_dir: Path) -> bool:
        """Put a claimed entry back under its name (for entries we must not touch)."""
        try:
            rename_noreplace(claim.data, uploads_dir / claim.rel)
        except OSError:
            return False
        self.journal.forget(claim)
        return True

    def release(self, claim: Claim) -> None:
        """The claim is delivered (its staging name is gone): forget it."""
        self.journal.forget(claim)

    def note_dest(self, claim: Claim, dest: str | Path) -> None:
        """Record the destination before the step that makes the file visible there."""
        claim.dest = os.fspath(dest)
        self.journal.note(claim, claim.dest)

    def hold(self, claim: Claim) -> Path:
        """Park a claim that policy says to keep (not redone at start-up), with its name."""
        target = self.held_dir / claim.data.name
        record = {"id": claim.id, "original_path": claim.rel, "claimed_at": claim.claimed_at}
        (self.held_dir / f"{claim.id}.json").write_text(json.dumps(record))
        os.rename(claim.data, target)
        self.journal.forget(claim)
        return target

    def recover(self) -> list[Claim]:
        """Adopt every unlocked (dead) daemon's directory and return the claims to redo."""
        claims: list[Claim] = []
        for other in sorted(self.root.glob("d-*")):
            lock_fd = None if other == self.dir else self._lock_if_dead(other)
            if lock_fd is None:
                continue
            try:
                claims.extend(self._adopt(other))
                shutil.rmtree(other, ignore_errors=True)
            finally:
                os.close(lock_fd)
        for unfinished in self.root.glob("t-*"):  # a start cut short: never held a claim
            if time.time() - unfinished.stat().st_mtime < 60:
                continue  # perhaps a daemon starting right now
            lock_fd = self._lock_if_dead(unfinished)
            if lock_fd is not None:
                shutil.rmtree(unfinished, ignore_errors=True)
                os.close(lock_fd)
        return claims

    def _adopt(self, other: Path) -> list[Claim]:
        """Journal each leftover claim in our journal, then move its data to our directory."""
        entries = Journal.read(other)
        claims = []
        for data in sorted(other.glob(f"*{_DATA}")):
            claim_id = data.name.removesuffix(_DATA)
            entry = entries.get(claim_id)
            if entry is None or "rel" not in entry:
                # Data without its line can only follow a power loss: keep the bytes, not the name.
                logger.bind(event="staging.unnamed", id=claim_id).warning("claim without a name")
                entry = {"rel": f"recovered/{claim_id}", "at": time.time()}
            claim = Claim(claim_id, entry["rel"], self.dir / data.name, entry["at"])
            self.journal.claim(claim)
            if entry.get("dest"):
                self.note_dest(claim, Path(entry["dest"]))
            try:
                os.rename(data, claim.data)
            except FileNotFoundError:
                self.journal.forget(claim)
                continue
            claims.append(claim)
        return claims

    @staticmethod
    def _lock_if_dead(directory: Path) -> int | None:
        """Lock a dead daemon's directory (its flock died with it); None if its owner lives."""
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd
