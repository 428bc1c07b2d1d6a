"""Provenance on delivered files: user extended attributes a consumer can read without the API.

Each file delivered to processed carries, on its inode:

    user.watcher.sha256      the bytes' sha256 (hex), as scanned
    user.watcher.verdict     clean, allowlisted or unscanned (infected after a late detection)
    user.watcher.definitions clamd's VERSION reply at the scan (engine/daily version/date)
    user.watcher.scanned_at  ISO 8601 UTC time of the verdict

They are set on the claim's inode after the scan and before the file is visible in processed
(a hard link shares them; a copy across mounts takes them along, `copy`), and any other
``user.watcher.*`` attribute (one an uploader set) is removed. Where the filesystem has no user
attributes (tmpfs before Linux 6.6, some network filesystems) or the daemon may not write them
(a file of another user without write permission) nothing is set, `provenance.skipped` is
logged once per reason and daemon start, and the delivery goes on: provenance never stops a
file. A consumer should trust the attributes where the daemon can write them (its own files,
or running as root): elsewhere an uploader's own ``user.watcher.*`` could not be removed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from watcher.store import iso

PREFIX = "user.watcher."
NAMES = ("sha256", "verdict", "definitions", "scanned_at")
_reported: set[int] = set()
_reported_lock = threading.Lock()


def values(verdict: dict[str, Any]) -> dict[str, bytes]:
    """The attributes for a verdict record (watcher/store VerdictRecord as JSON)."""
    decided = verdict.get("decided_at")
    found = {
        "sha256": verdict.get("sha256"),
        "verdict": verdict.get("verdict"),
        "definitions": verdict.get("definitions"),
        "scanned_at": iso(decided) if isinstance(decided, int | float) else None,
    }
    return {PREFIX + k: str(v).encode() for k, v in found.items() if v is not None}


def stamp(fd: int, verdict: dict[str, Any]) -> bool:
    """Set the attributes on the open file; False (logged once per cause) where it cannot."""
    wanted = values(verdict)
    try:
        for name in os.listxattr(fd):
            if name.startswith(PREFIX) and name not in wanted:
                os.removexattr(fd, name)
        for name, value in wanted.items():
            os.setxattr(fd, name, value)
    except OSError as err:  # whatever the cause: attributes never stop a delivery
        _skipped(err)
        return False
    return True


def copy(src_fd: int, dst_fd: int) -> None:
    """Take a file's ``user.watcher.*`` attributes along to its copy, where both allow it."""
    try:
        for name in os.listxattr(src_fd):
            if name.startswith(PREFIX):
                os.setxattr(dst_fd, name, os.getxattr(src_fd, name))
    except OSError as err:
        _skipped(err)


def read(path: str | os.PathLike[str]) -> dict[str, str]:
    """The provenance attributes of a file, without the prefix (for tests and tools)."""
    found = {}
    with contextlib.suppress(OSError):
        for name in os.listxattr(path, follow_symlinks=False):
            if name.startswith(PREFIX):
                value = os.getxattr(path, name, follow_symlinks=False)
                found[name.removeprefix(PREFIX)] = value.decode(errors="replace")
    return found


def forget_reports() -> None:
    """Each daemon start logs each reason once again (Deliverer.start)."""
    with _reported_lock:
        _reported.clear()


def _skipped(err: OSError) -> None:
    # Imported here: fsops (and so `watcher healthcheck`) must not load the logging stack.
    from watcher.logs import emit

    with _reported_lock:
        if err.errno in _reported:
            return
        _reported.add(err.errno or 0)
    emit("provenance.skipped", reason=err.strerror or str(err))
