"""Claims: the filesystem is the journal.

A claim renames an upload into this daemon's private staging directory (on the uploads
filesystem, so the rename is atomic) under a generated name, beside a small JSON record of
where it came from. Whatever exists in staging after a crash is redone at the next start;
a record whose data is gone was delivered (or never claimed) and is dropped.

Each daemon has its own directory, locked with flock for its lifetime, so two daemons on one
uploads volume never process the same claim; a dead daemon's directory is adopted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from watcher.fsops import fsync_dir, rename_noreplace, write_json_atomic

_RECORD = ".json"
_DATA = ".data"


def new_id(now: datetime | None = None) -> str:
    """Time-sortable, unique: ``20261128T221500Z-3f9a1c2b7d4e``."""
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


@dataclass
class Claim:
    id: str
    rel: str  # the upload's path relative to the uploads directory (a str; may hold surrogates)
    data: Path
    record: Path
    claimed_at: str
    dest: str | None = None  # set before a non-atomic delivery step (see Staging.note_dest)
    attempts: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def save(self) -> None:
        body = {"id": self.id, "rel": self.rel, "claimed_at": self.claimed_at, "dest": self.dest}
        write_json_atomic(self.record, json.dumps(body).encode())


class Staging:
    """This daemon's claim directory under ``<uploads>/.watcher/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / f"d-{os.getpid()}-{secrets.token_hex(4)}"
        self.held_dir = root / "held"
        self._lock_fd: int | None = None

    def open(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.held_dir.mkdir(mode=0o700, exist_ok=True)
        self.dir.mkdir(mode=0o700)
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        """Release our directory; an empty one is removed, a non-empty one is adopted later."""
        if self._lock_fd is None:
            return
        leftovers = [p for p in self.dir.iterdir() if p.name != "lock"]
        if not leftovers:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def claim(self, upload: Path, rel: str) -> Claim | None:
        """Take ``upload`` for ourselves; None if someone else took it first."""
        claim_id = new_id()
        claim = Claim(
            id=claim_id,
            rel=rel,
            data=self.dir / f"{claim_id}{_DATA}",
            record=self.dir / f"{claim_id}{_RECORD}",
            claimed_at=datetime.now(UTC).isoformat(),
        )
        claim.save()  # the record first: data without a record would lose its name
        try:
            os.rename(upload, claim.data)
        except FileNotFoundError:
            claim.record.unlink()
            return None
        return claim

    def unclaim(self, claim: Claim, uploads_dir: Path) -> bool:
        """Put a claimed entry back under its name (for entries we must not touch)."""
        try:
            rename_noreplace(claim.data, uploads_dir / claim.rel)
        except OSError:
            return False
        claim.record.unlink(missing_ok=True)
        return True

    def release(self, claim: Claim) -> None:
        """The claim is delivered: forget it."""
        claim.record.unlink(missing_ok=True)

    def note_dest(self, claim: Claim, dest: Path) -> None:
        """Record the destination before a step that is not one atomic rename."""
        claim.dest = str(dest)
        claim.save()

    def hold(self, claim: Claim) -> Path:
        """Park a claim that policy says to keep (not redone at start-up)."""
        target = self.held_dir / claim.data.name
        os.rename(claim.data, target)
        os.rename(claim.record, self.held_dir / claim.record.name)
        return target

    def recover(self) -> list[Claim]:
        """Adopt every unlocked (dead) daemon's directory and return the claims to redo."""
        claims: list[Claim] = []
        for other in sorted(self.root.glob("d-*")):
            lock_fd = None if other == self.dir else self._lock_if_dead(other)
            if lock_fd is None:
                continue
            try:
                for entry in sorted(other.iterdir()):
                    if entry.name != "lock":
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(entry, self.dir / entry.name)
                shutil.rmtree(other, ignore_errors=True)
            finally:
                os.close(lock_fd)
        for stray in self.dir.glob(".*.tmp"):  # a record write cut short; its claim never ran
            stray.unlink()
        for record in sorted(self.dir.glob(f"*{_RECORD}")):
            claim = self._load(record)
            if claim is not None:
                claims.append(claim)
        for data in self.dir.glob(f"*{_DATA}"):  # data whose record was lost (power loss)
            record = data.with_suffix(_RECORD)
            if not record.exists():
                claim_id = data.name.removesuffix(_DATA)
                claim = Claim(claim_id, f"recovered/{claim_id}", data, record, "")
                claim.save()
                claims.append(claim)
        fsync_dir(self.dir)
        return claims

    def _load(self, record: Path) -> Claim | None:
        try:
            body = json.loads(record.read_bytes())
        except (OSError, ValueError):
            logger.bind(event="staging.bad_record", path=str(record)).warning("unreadable record")
            return None
        data = record.with_suffix(_DATA)
        if not os.path.lexists(data):
            record.unlink()  # delivered, or the claim's rename never happened
            return None
        return Claim(body["id"], body["rel"], data, record, body["claimed_at"], body.get("dest"))

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
