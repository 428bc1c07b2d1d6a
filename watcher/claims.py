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

Each daemon has its own directory, holding a lease it renews (watcher/leases.py) and locked
with flock for its lifetime, so two daemons on one uploads volume never process the same claim;
a dead daemon's directory is adopted: when its lease has not moved for the lease bound, and its
flock (where the filesystem shares locks between hosts) is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.errors import LeaseLost, StorageError
from watcher.fsops import (
    DIR_FLAGS,
    OPEN_UPLOAD_FLAGS,
    copy_to_new_file,
    open_beneath,
    open_root,
    rename_noreplace,
    split_rel,
    write_json_atomic,
)
from watcher.leases import (
    LeaseWatch,
    OwnLease,
    Stamp,
    host_identity,
    owner_host,
    read_stamp,
    take,
)
from watcher.logs import emit

_DATA = ".data"
HELD = "held"
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
    errors: int = 0  # failures to read it (or to deliver it, for a cause bound to the file)
    delivery_failures: int = 0  # a destination refused it, in a row
    verdict: dict[str, Any] | None = None  # noted before delivery (watcher/recording.py)

    @property
    def name(self) -> str:
        """The claim's file name in its staging directory."""
        return self.data.name


class Journal:
    """Append-only JSON lines, in segments, in a directory held open; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir_fd = -1
        self._fd = -1
        self._segment = 0
        self._size = 0
        self._outstanding: dict[int, int] = {}

    def open(self, dir_fd: int) -> None:
        with self._lock:
            self._dir_fd = dir_fd
            self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._outstanding.get(self._segment):
                self._unlink(self._segment)

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

    def note_verdict(self, claim: Claim, verdict: dict[str, Any]) -> None:
        with self._lock:
            self._write({"id": claim.id, "verdict": verdict})

    def forget(self, claim: Claim) -> None:
        """The claim is settled; its segment goes when nothing in it is outstanding."""
        with self._lock:
            left = self._outstanding.get(claim.segment, 0) - 1
            if left > 0 or claim.segment == self._segment:
                self._outstanding[claim.segment] = max(left, 0)
                return
            self._outstanding.pop(claim.segment, None)
            self._unlink(claim.segment)

    @staticmethod
    def read(dir_fd: int) -> dict[str, dict[str, Any]]:
        """Every claim announced in a directory's segments, later lines updating earlier ones."""
        entries: dict[str, dict[str, Any]] = {}
        for segment in sorted(n for n in os.listdir(dir_fd) if n.startswith(_SEGMENT)):
            fd = os.open(segment, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            for fields in parse_journal(data + b"\n"):  # a crash's last line: torn, skipped
                entries.setdefault(fields["id"], {}).update(fields)
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
                self._unlink(self._segment)
        self._segment += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._name(self._segment), flags, 0o600, dir_fd=self._dir_fd)
        self._size = 0

    def _unlink(self, segment: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(segment), dir_fd=self._dir_fd)

    @staticmethod
    def _name(segment: int) -> str:
        return f"{_SEGMENT}{segment:06}"


class Staging:
    """This daemon's claim directory under ``<uploads>/.watcher/``, held open by fd.

    ``.watcher`` is made (and found again) without following a link: a symlink, a file or a
    directory of another owner planted under that name is moved aside, never used.
    """

    def __init__(
        self, root: Path, lease_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root = root
        self.dir = root / f"d-{os.getpid()}-{secrets.token_hex(4)}"
        self.held_dir = root / HELD
        self.journal = Journal()
        self.root_fd = -1  # held open: if someone renames `.watcher`, we keep using ours
        self.dir_fd = -1
        self._lock_fd: int | None = None
        self.lease = OwnLease(lease_s, clock)
        self._leases = LeaseWatch(lease_s, clock)  # the other daemons' directories
        self._host = host_identity()
        self._recovering = threading.Lock()

    def open(self) -> None:
        uploads_fd = open_root(self.root.parent)
        try:
            self.root_fd = root_fd = private_dir(uploads_fd, self.root.name)
        finally:
            os.close(uploads_fd)
        self.identity = _identity(os.fstat(root_fd))
        os.close(private_dir(root_fd, HELD))
        # Locked under a name recovery ignores, then renamed: another daemon recovering at this
        # moment must never see (and adopt) a `d-*` directory that has no lock yet.
        setting_up = f"t-{self.dir.name}"
        os.mkdir(setting_up, 0o700, dir_fd=root_fd)
        self.dir_fd = os.open(setting_up, DIR_FLAGS, dir_fd=root_fd)  # the same once renamed
        lock_flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._lock_fd = os.open("lock", lock_flags, 0o600, dir_fd=self.dir_fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.lease.create(self.dir_fd)
        os.rename(setting_up, self.dir.name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        self.journal.open(self.dir_fd)

    def close(self) -> None:
        """Release our directory; an empty one is removed, a non-empty one is adopted later."""
        if self._lock_fd is None:
            return
        self.journal.close()
        # Empty: removed. Claims left: released, for others to adopt at once. Taken over (the
        # lease lost): the directory is the adopter's to empty.
        empty = not self.lease.lost and not any(n.endswith(_DATA) for n in os.listdir(self.dir_fd))
        if not empty:
            self.lease.release()
        self.lease.close()
        for fd in (self.dir_fd, self._lock_fd):
            os.close(fd)
        if empty:  # removed once nothing in it is open (see `_remove_closed`)
            _remove_closed(self.root_fd, self.dir.name)
        os.close(self.root_fd)
        self.dir_fd = self.root_fd = -1
        self._lock_fd = None

    def claim(self, parent_fd: int, name: str, rel: str) -> Claim | None:
        """Take ``name`` (in the uploads directory ``parent_fd``) for ourselves.

        None if someone else took it first, or our lease is not fresh (the upload waits).
        """
        if not self.lease.held():
            return None
        claim_id = new_id()
        claim = Claim(claim_id, rel, self.dir / f"{claim_id}{_DATA}", time.time())
        self.journal.claim(claim)  # first: data without its journal line would lose its name
        try:
            os.rename(name, claim.name, src_dir_fd=parent_fd, dst_dir_fd=self.dir_fd)
        except FileNotFoundError:
            self.journal.forget(claim)
            return None
        return claim

    def open_claim(self, claim: Claim) -> int:
        return os.open(claim.name, OPEN_UPLOAD_FLAGS, dir_fd=self.dir_fd)

    def lstat_claim(self, claim: Claim) -> os.stat_result:
        return os.stat(claim.name, dir_fd=self.dir_fd, follow_symlinks=False)

    def privatize(self, claim: Claim, fd: int) -> int:
        """Replace the claim's bytes by a copy only we hold; returns an fd of the copy.

        For a file someone else may still write (an fd opened before we claimed it, a lease we
        cannot take): from here on the claim is our own inode, and the uploader's is let go.
        """
        copy = f"{claim.id}.copy"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy, dir_fd=self.dir_fd)  # left by a crash mid-copy
        copy_to_new_file(fd, self.dir_fd, copy, os.fstat(fd).st_mode & 0o777 | 0o600)
        os.replace(copy, claim.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        return self.open_claim(claim)

    def drop(self, claim: Claim) -> None:
        """Remove the claim's staging name (its bytes have a durable name elsewhere)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim.name, dir_fd=self.dir_fd)
        self.journal.forget(claim)

    def unclaim(self, claim: Claim, uploads_dir: Path) -> bool:
        """Put a claimed entry back under its name (for entries we must not touch)."""
        try:
            parts = split_rel(claim.rel)
            uploads_fd = open_root(uploads_dir)
            try:
                parent = open_beneath(uploads_fd, parts[:-1])
            finally:
                os.close(uploads_fd)
            try:
                rename_noreplace(self.dir_fd, claim.name, parent, parts[-1])
            finally:
                os.close(parent)
        except (OSError, ValueError):
            return False
        self.journal.forget(claim)
        return True

    def note_dest(self, claim: Claim, dest: str | Path) -> None:
        """Record the destination before the step that makes the file visible there."""
        if not self.lease.held():  # another daemon may be adopting this claim
            raise LeaseLost("our staging lease is not fresh: delivery waits")
        claim.dest = os.fspath(dest)
        self.journal.note(claim, claim.dest)

    def note_verdict(self, claim: Claim, verdict: dict[str, Any]) -> None:
        """Record the verdict before its delivery: a crash after the file arrived but before
        its record was stored leaves it here for the next start (watcher/recording.py)."""
        claim.verdict = verdict
        self.journal.note_verdict(claim, verdict)

    def hold(self, claim: Claim) -> Path:
        """Park a claim that policy says to keep (not redone at start-up), with its name."""
        record = {"id": claim.id, "original_path": claim.rel, "claimed_at": claim.claimed_at}
        held_fd = os.open(HELD, DIR_FLAGS, dir_fd=self.root_fd)
        try:
            write_json_atomic(Path(f"{claim.id}.json"), json.dumps(record).encode(), dir_fd=held_fd)
            rename_noreplace(self.dir_fd, claim.name, held_fd, claim.name)
            os.fsync(held_fd)
        finally:
            os.close(held_fd)
        self.journal.forget(claim)
        return self.held_dir / claim.name

    def renew_lease(self) -> bool:
        """Renew our lease (watcher/leases.py); False once another daemon took it."""
        return self.lease.renew()

    def orphans_due(self) -> bool:
        """Whether some other daemon's lease has expired (looked at afresh)."""
        with self._recovering:
            return any(self._lease_expired(name) for name in self._others())

    def recover(self) -> list[Claim]:
        """Adopt every dead daemon's directory and return the claims to redo.

        Dead: its lease has not moved for the lease bound (by our clock; from the first time
        we look, so never at once unless it was released), and its flock is free.
        """
        with self._recovering:
            return self._recover()

    def _others(self) -> list[str]:
        names = [n for n in os.listdir(self.root_fd) if n.startswith("d-") and n != self.dir.name]
        self._leases.keep_only(set(names))
        return sorted(names)

    def _lease_expired(self, name: str) -> bool:
        return self._dead_by_lease(name, read_stamp(self.root_fd, name))

    def _dead_by_lease(self, name: str, stamp: Stamp) -> bool:
        """Its lease expired, or its owner ran on this host (then the flock tells at once)."""
        if self._leases.expired(name, stamp):
            return True
        return (
            isinstance(stamp, tuple)
            and self._host is not None
            and owner_host(self.root_fd, name) == self._host
        )

    def _recover(self) -> list[Claim]:
        claims: list[Claim] = []
        if not self.lease.held():
            return claims  # we may be the one about to be adopted
        for name in self._others():
            stamp = read_stamp(self.root_fd, name)
            if not self._dead_by_lease(name, stamp):
                continue
            lock_fd = self._lock_if_dead(name)
            if lock_fd is None:
                continue
            try:
                adopted = take(self.root_fd, name, stamp, self.dir.name)
                if adopted:
                    claims.extend(self._adopt(name))
            finally:
                os.close(lock_fd)
            if adopted:
                self._remove_adopted(name)
        names = sorted(os.listdir(self.root_fd))
        for name in names:  # a start cut short: never held a claim
            if not name.startswith("t-") or name == f"t-{self.dir.name}":
                continue
            with contextlib.suppress(FileNotFoundError):
                mtime = os.stat(name, dir_fd=self.root_fd, follow_symlinks=False).st_mtime
                if time.time() - mtime < 60:
                    continue  # perhaps a daemon starting right now
            lock_fd = self._lock_if_dead(name)
            if lock_fd is not None:
                os.close(lock_fd)
                _remove_closed(self.root_fd, name)
        return claims

    def _remove_adopted(self, name: str) -> None:
        """Remove an adopted directory, unless data is in it again (an owner that woke from
        a freeze longer than the lease): then it stays, leaseless, to be adopted later."""
        fd = os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
        try:
            left = os.listdir(fd)
            if any(n.endswith(_DATA) for n in left):
                return
            for entry in left:
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=self.root_fd)

    def _adopt(self, name: str) -> list[Claim]:
        """Journal each leftover claim in our journal, then move its data to our directory."""
        other_fd = os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
        try:
            return self._adopt_from(other_fd)
        finally:
            os.close(other_fd)

    def _adopt_from(self, other_fd: int) -> list[Claim]:
        entries = Journal.read(other_fd)
        claims = []
        for data in sorted(n for n in os.listdir(other_fd) if n.endswith(_DATA)):
            claim_id = data.removesuffix(_DATA)
            entry = entries.get(claim_id)
            if entry is None or "rel" not in entry:
                # Data without its line can only follow a power loss: keep the bytes, not the name.
                emit("staging.unnamed", id=claim_id)
                entry = {"rel": f"recovered/{claim_id}", "at": time.time()}
            claim = Claim(claim_id, entry["rel"], self.dir / data, entry["at"])
            self.journal.claim(claim)
            if isinstance(entry.get("verdict"), dict):
                self.note_verdict(claim, entry["verdict"])
            if entry.get("dest"):
                self.note_dest(claim, Path(entry["dest"]))
            try:
                os.rename(data, data, src_dir_fd=other_fd, dst_dir_fd=self.dir_fd)
            except FileNotFoundError:
                self.journal.forget(claim)
                continue
            claims.append(claim)
        return claims

    def _lock_if_dead(self, name: str) -> int | None:
        """Lock a dead daemon's directory (its flock died with it); None if its owner holds
        it. Only a "no" means anything: where locks are kernel-local (NFS ``nolock``, FUSE),
        another host's lock is never seen, and only the lease tells."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(f"{name}/lock", flags, 0o600, dir_fd=self.root_fd)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def _remove_closed(root_fd: int, name: str) -> None:
    """Remove a staging directory once we hold nothing open in it: NFS and FUSE keep a file
    that is unlinked while open under a hidden name (``.nfs…``, ``.fuse_hidden…``) until it
    is closed, and the directory cannot be removed meanwhile (it would stay behind, empty)."""
    shutil.rmtree(name, dir_fd=root_fd, ignore_errors=True)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def private_dir(parent_fd: int, name: str) -> int:
    """Our own 0700 directory ``name`` in ``parent_fd``, made if missing; an fd to it.

    Whatever else holds the name (a symlink, a file, a directory someone else owns, perhaps
    planted by an uploader before we first ran) is moved aside and never followed or used.
    """
    for _ in range(5):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except NotADirectoryError:
            _move_aside(parent_fd, name, "not a directory")
            continue
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            os.close(fd)
            _move_aside(parent_fd, name, f"owned by uid {owner}")
            continue
        os.fchmod(fd, 0o700)
        return fd
    raise StorageError(f"cannot make our directory {name!r}: something keeps taking its place")


def _move_aside(parent_fd: int, name: str, why: str) -> None:
    aside = f"{name}.impostor-{new_id()}"
    try:
        os.rename(name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except FileNotFoundError:
        return
    emit("staging.impostor", name=name, moved_to=aside, reason=why)


# -- the journal's format, for readers outside the daemon that writes it --------------------
# A segment holds one JSON object a line: {"id", "rel", "at"} when a claim is made (its bytes
# are then <daemon dir>/<id>.data until delivered), {"id", "dest"} before a delivery step,
# {"id", "verdict"} before the first one (a VerdictRecord as JSON: watcher/recording.py).


def journal_segments(staging_root: Path) -> list[Path]:
    """Every daemon's journal segments below ``<uploads>/.watcher``."""
    return sorted(staging_root.glob(f"d-*/{_SEGMENT}*"))


def parse_journal(data: bytes) -> Iterator[dict[str, Any]]:
    """The complete lines of a segment's bytes, parsed; a line still being written (no
    newline yet) and a line torn by a crash (its step never began) are left out."""
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if isinstance(fields, dict) and isinstance(fields.get("id"), str):
            yield fields


def claim_data(segment: Path, claim_id: str) -> Path:
    """Where the bytes of a claim announced in `segment` are while it is not delivered."""
    return segment.parent / f"{claim_id}{_DATA}"


def claimed_files(staging_root: Path) -> list[Path]:
    """The bytes of every claim in staging, every daemon's."""
    return sorted(staging_root.glob(f"d-*/*{_DATA}"))
