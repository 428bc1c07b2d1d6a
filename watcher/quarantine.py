"""Quarantine management: list, show, restore (for false positives) and delete entries.

An entry is ``<quarantine>/<id>`` (the bytes, mode 0400) beside ``<id>.json`` (its metadata).
Restore checks the bytes still match the recorded sha256, adds that sha256 to the allowlist
(so the same file arriving again is delivered, logged `file.allowlisted`), moves the bytes
under their original relative path into the target directory without overwriting (a taken
name gets `` (1)``), and records `restored_at` / `restored_to` in the metadata. A stored path
that is absolute, holds ``..`` or would leave the target directory through a symlink is refused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from watcher.allowlist import Allowlist
from watcher.errors import EntryNotFound, QuarantineError
from watcher.fsops import (
    copy_fd_to_new_file,
    fsync_dir,
    noclobber_names,
    rename_noreplace,
    sha256_fd,
    write_json_atomic,
)

_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,99}$")
RESTORED_FILE_MODE = 0o644


@dataclass(frozen=True)
class Entry:
    id: str
    meta: dict[str, Any]
    data: Path

    @property
    def state(self) -> str:
        if self.meta.get("restored_at"):
            return "restored"
        return "quarantined" if os.path.lexists(self.data) else "missing"

    def to_json(self) -> dict[str, Any]:
        return {**self.meta, "id": self.id, "state": self.state}


class Quarantine:
    def __init__(self, directory: Path, allowlist: Allowlist) -> None:
        self.directory = directory
        self.allowlist = allowlist

    def entries(self) -> list[Entry]:
        """Every entry with a metadata record, oldest first (ids sort by time)."""
        if not self.directory.is_dir():
            return []
        found = []
        for record in sorted(self.directory.glob("*.json")):
            entry_id = record.name.removesuffix(".json")
            if _ID.match(entry_id):
                try:
                    found.append(self.get(entry_id))
                except QuarantineError:
                    continue
        return found

    def get(self, entry_id: str) -> Entry:
        if not _ID.match(entry_id):
            raise EntryNotFound(f"not a quarantine id: {entry_id!r}")
        record = self.directory / f"{entry_id}.json"
        try:
            meta = json.loads(record.read_bytes())
        except FileNotFoundError:
            raise EntryNotFound(f"no quarantine entry {entry_id}") from None
        except (OSError, ValueError) as err:
            raise QuarantineError(f"unreadable metadata {record}: {err}") from err
        if not isinstance(meta, dict):
            raise QuarantineError(f"unreadable metadata {record}: not an object")
        return Entry(entry_id, meta, self.directory / entry_id)

    def restore(self, entry_id: str, target_dir: Path, now: datetime | None = None) -> Path:
        """Move an entry's bytes back under its original name in `target_dir`; allowlist them."""
        entry = self.get(entry_id)
        if entry.state != "quarantined":
            where = entry.meta.get("restored_to", "")
            raise QuarantineError(f"{entry_id} is {entry.state} {where}".rstrip())
        if not target_dir.is_dir():
            raise QuarantineError(f"target directory does not exist: {target_dir}")
        dest = safe_destination(target_dir, entry.meta.get("original_path"))
        when = (now or datetime.now(UTC)).isoformat()
        try:
            restored, sha = self._restore(entry, dest, target_dir, when)
        except OSError as err:
            raise QuarantineError(f"{entry_id}: restore failed: {err}") from err
        logger.bind(
            event="quarantine.restored", id=entry_id, dest=str(restored), sha256=sha,
            original_path=entry.meta.get("original_path"),
        ).warning("restored from quarantine; sha256 allowlisted")  # fmt: skip
        return restored

    def _restore(self, entry: Entry, dest: Path, target_dir: Path, when: str) -> tuple[Path, str]:
        entry_id = entry.id
        fd = os.open(entry.data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise QuarantineError(f"{entry.data} is not a regular file")
            sha = sha256_fd(fd)
            if sha != entry.meta.get("sha256"):
                raise QuarantineError(f"{entry_id}: bytes do not match the recorded sha256")
            self.allowlist.add(
                sha, quarantine_id=entry_id, original_path=entry.meta.get("original_path"),
                signature=entry.meta.get("signature"), allowlisted_at=when,
            )  # fmt: skip
            dest.parent.mkdir(parents=True, exist_ok=True)
            safe_destination(target_dir, entry.meta.get("original_path"))  # parents now exist
            restored = self._move(entry, fd, dest)
        finally:
            os.close(fd)
        meta = {**entry.meta, "restored_at": when, "restored_to": str(restored)}
        write_json_atomic(self.directory / f"{entry_id}.json", json.dumps(meta, indent=1).encode())
        fsync_dir(self.directory)
        return restored, sha

    def delete(self, entry_id: str) -> Entry:
        """Remove the bytes (if still there) and the metadata record."""
        entry = self.get(entry_id)
        try:
            entry.data.unlink(missing_ok=True)
            (self.directory / f"{entry_id}.json").unlink(missing_ok=True)
            fsync_dir(self.directory)
        except OSError as err:
            raise QuarantineError(f"{entry_id}: delete failed: {err}") from err
        logger.bind(
            event="quarantine.deleted", id=entry_id, sha256=entry.meta.get("sha256"),
            original_path=entry.meta.get("original_path"),
        ).info("deleted from quarantine")  # fmt: skip
        return entry

    def _move(self, entry: Entry, fd: int, dest: Path) -> Path:
        """No-clobber: rename within a filesystem; across, copy + fsync + rename, then unlink."""
        names = noclobber_names(dest.name)
        same_fs = os.fstat(fd).st_dev == os.stat(dest.parent).st_dev
        source = entry.data
        if not same_fs:
            source = dest.parent / f".watcher-restore-{entry.id}.tmp"
            source.unlink(missing_ok=True)  # left by an earlier attempt cut short
            copy_fd_to_new_file(fd, source, RESTORED_FILE_MODE)
        for n in itertools.count():
            candidate = dest.parent / names(n)
            try:
                rename_noreplace(source, candidate)
            except FileExistsError:
                continue
            break
        os.chmod(candidate, RESTORED_FILE_MODE)
        fsync_dir(dest.parent)
        if not same_fs:
            entry.data.unlink()
        return candidate


def safe_destination(target_dir: Path, original_path: object) -> Path:
    """``target_dir / original_path``, or QuarantineError when that would leave target_dir."""
    if not isinstance(original_path, str) or not original_path.strip("/"):
        raise QuarantineError(f"no usable original path recorded: {original_path!r}")
    problem = None
    if "\0" in original_path:
        problem = "holds a NUL byte"
    elif original_path.startswith("/"):
        problem = "is absolute"
    elif ".." in original_path.split("/"):
        problem = "holds '..'"
    if problem is None:
        dest = target_dir / os.path.normpath(original_path)
        root = os.path.realpath(target_dir)
        ancestor = dest.parent
        while not os.path.lexists(ancestor):
            ancestor = ancestor.parent
        real = os.path.realpath(ancestor)
        if real == root or real.startswith(root + os.sep):
            return dest
        problem = "leads through a symlink out of it"
    raise QuarantineError(
        f"refusing to restore: stored path {original_path!r} {problem} "
        f"(it must stay inside {target_dir})"
    )
