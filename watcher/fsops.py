"""Low-level file operations that never overwrite, never follow symlinks and survive crashes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

from watcher.errors import StorageError, StorageFull

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)

OPEN_UPLOAD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
COPY_CHUNK_BYTES = 1024 * 1024
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def storage_error(err: OSError, what: str, directory: Path | None = None) -> StorageError:
    """Translate an OSError once; a full disk is its own, transient, error."""
    if err.errno in _FULL_ERRNOS:
        return StorageFull(f"{what}: {err.strerror}", directory)
    return StorageError(f"{what}: {err}")


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically rename, raising FileExistsError if dst exists (renameat2 RENAME_NOREPLACE).

    Filesystems without RENAME_NOREPLACE fall back to link + unlink, which is equally
    no-clobber; callers note the destination first, so a crash in between is finished, not
    redone (see deliver.finish_interrupted).
    """
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(dst))
    os.link(src, dst, follow_symlinks=False)  # EEXIST if taken
    os.unlink(src)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def relative_to(path: str | Path, root: str | Path) -> str | None:
    """``path`` relative to ``root`` by plain prefix (no normalisation), None if outside.

    os.path.relpath normalises both sides on every call; paths here are built from the root.
    """
    path, root = os.fspath(path), os.fspath(root).rstrip(os.sep)
    if path.startswith(root + os.sep):
        return path[len(root) + 1 :]
    return None


def sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, COPY_CHUNK_BYTES, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def copy_fd_to_new_file(src_fd: int, dst: Path, mode: int = 0o600) -> None:
    """Copy into a file that must not exist yet (O_EXCL, O_NOFOLLOW), then fsync it."""
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        offset = 0
        while chunk := os.pread(src_fd, COPY_CHUNK_BYTES, offset):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            offset += len(chunk)
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(dst)
        raise
    os.close(out)


def write_json_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a small record under a temp name and rename it into place (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def noclobber_names(name: str) -> Callable[[int], str]:
    """``report.pdf`` -> ``report (1).pdf``; keeps the whole name within 255 bytes."""
    stem, dot, ext = name.rpartition(".")
    if not stem or len(ext) > 16:
        stem, dot, ext = name, "", ""

    def nth(n: int) -> str:
        if n == 0:
            return name
        tail = f" ({n}){dot}{ext}"
        room = 255 - len(os.fsencode(tail))
        return os.fsdecode(os.fsencode(stem)[:room]) + tail

    return nth


def writer_active(path: Path) -> bool | None:
    """Is anyone holding ``path`` open for writing? None when the kernel can't tell us.

    A read lease is refused (EAGAIN) while any writer has the file open. Leases need SIGIO
    to be handled or ignored: a lease break would otherwise kill the process.
    """
    if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
        return None
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None  # never open a device, FIFO or socket just to ask
        fd = os.open(path, OPEN_UPLOAD_FLAGS)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as err:
        return True if err.errno in (errno.EAGAIN, errno.EBUSY) else None
    finally:
        os.close(fd)
