"""Quarantine management: list, show, restore (for false positives) and delete entries.

An entry is ``<quarantine>/<id>`` (the bytes, mode 0400) beside ``<id>.json`` (its metadata).
Restore checks the bytes still match the recorded sha256, adds that sha256 to the allowlist
(so the same file arriving again is delivered, logged `file.allowlisted`) once the bytes are
back under their original relative path in the target directory (no overwriting: a taken name
gets `` (1)``; across mounts by a copy), and records `restored_at` / `restored_to` in the
metadata. A stored path that is absolute, holds ``..`` or leads through a symlink is refused.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.allowlist import Allowlist
from watcher.errors import EntryNotFound, QuarantineError
from watcher.fsops import (
    fsync_dir,
    make_dirs_beneath,
    noclobber_names,
    open_root,
    place_noclobber,
    sha256_fd,
    write_json_atomic,
)
from watcher.logs import emit
from watcher.verdict import Outcome

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
        parts = safe_parts(target_dir, entry.meta.get("original_path"))
        when = (now or datetime.now(UTC)).isoformat()
        try:
            restored, sha = self._restore(entry, parts, target_dir, when)
        except OSError as err:
            raise QuarantineError(f"{entry_id}: restore failed: {err}") from err
        emit(
            "quarantine.restored",
            id=entry_id,
            dest=str(restored),
            sha256=sha,
            original_path=entry.meta.get("original_path"),
        )
        return restored

    def _restore(
        self, entry: Entry, parts: list[str], target_dir: Path, when: str
    ) -> tuple[Path, str]:
        qdir = open_root(self.directory)
        try:
            fd = os.open(entry.id, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=qdir)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise QuarantineError(f"{entry.data} is not a regular file")
                sha = sha256_fd(fd)
                if sha != entry.meta.get("sha256"):
                    raise QuarantineError(f"{entry.id}: bytes do not match the recorded sha256")
                restored = self._move(entry, qdir, fd, target_dir, parts)
            finally:
                os.close(fd)
            # Only now that the bytes are back: a restore that failed allowlists nothing.
            self.allowlist.add(
                sha,
                quarantine_id=entry.id,
                original_path=entry.meta.get("original_path"),
                signature=entry.meta.get("signature"),
                allowlisted_at=when,
            )
            meta = {**entry.meta, "restored_at": when, "restored_to": str(restored)}
            write_json_atomic(
                Path(f"{entry.id}.json"), json.dumps(meta, indent=1).encode(), dir_fd=qdir
            )
            os.fsync(qdir)
        finally:
            os.close(qdir)
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
        emit(
            "quarantine.deleted",
            id=entry_id,
            sha256=entry.meta.get("sha256"),
            original_path=entry.meta.get("original_path"),
        )
        return entry

    def _move(self, entry: Entry, qdir: int, fd: int, target_dir: Path, parts: list[str]) -> Path:
        """No-clobber, never through a symlink in the target; across mounts by a copy."""
        root = open_root(target_dir)
        try:
            parent, _ = make_dirs_beneath(root, parts[:-1], 0o777, rename_clashes=False)
        except NotADirectoryError:
            raise QuarantineError(
                f"refusing to restore: stored path {entry.meta.get('original_path')!r} leads "
                f"through a symlink or a file (it must stay inside {target_dir})"
            ) from None
        finally:
            os.close(root)
        try:
            name, _ = place_noclobber(
                qdir,
                entry.id,
                fd,
                parent,
                noclobber_names(parts[-1]),
                tmp_name=f".watcher-restore-{entry.id}.tmp",
                mode=RESTORED_FILE_MODE,
            )
            os.chmod(name, RESTORED_FILE_MODE, dir_fd=parent, follow_symlinks=False)
            os.fsync(parent)
        finally:
            os.close(parent)
        os.unlink(entry.id, dir_fd=qdir)  # the restored name is durable: drop this one
        return target_dir.joinpath(*parts[:-1], name)


def new_record(
    entry_id: str,
    original_path: str,
    outcome: Outcome,
    *,
    size: int | None,
    sha256: str | None,
    clamd_version: str | None,
    signature: str | None = None,
    reason: str | None = None,
    cause: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata record ``<id>.json`` of a quarantined file: the one place it is made.

    ``verdict`` is the outcome's word (infected, unscannable); `extra` adds what the writer
    knows besides (when it was claimed; for a late detection, where it was delivered).
    """
    return {
        "id": entry_id,
        "original_path": original_path,
        "size": size,
        "sha256": sha256,
        "verdict": outcome.verdict_word,
        "signature": signature,
        "reason": reason,
        "cause": cause,
        "detected_at": datetime.now(UTC).isoformat(),
        "clamd_version": clamd_version,
        **extra,
    }


def safe_parts(target_dir: Path, original_path: object) -> list[str]:
    """The stored path as components below `target_dir`, or QuarantineError if it climbs out."""
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
        parts = [p for p in original_path.split("/") if p not in ("", ".")]
        if parts:
            return parts
        problem = "is empty"
    raise QuarantineError(
        f"refusing to restore: stored path {original_path!r} {problem} "
        f"(it must stay inside {target_dir})"
    )
