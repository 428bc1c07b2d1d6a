"""Low-level file operations that never overwrite, never follow symlinks and survive crashes.

Paths below a watched root are never handed to the kernel whole: a directory an uploader swaps
for a symlink between our check and our use would send a whole-path call elsewhere. A relative
path is walked one component at a time from an open directory fd, each opened with O_NOFOLLOW
(`open_beneath`, `make_dirs_beneath`); the final step is an ``*at`` call on that fd. Roots
themselves (WATCHER_UPLOADS_DIR, ...) are the operator's and are opened by path, per operation,
so a root that is replaced while we run is found again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import signal
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from watcher import provenance
from watcher.errors import StorageError, StorageFull

_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)

OPEN_UPLOAD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_CHUNK_BYTES = 1024 * 1024
MAX_NAME_BYTES = 255
_MAX_CLASHES = 10_000  # `name (n)` candidates tried before giving up
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def storage_error(err: OSError, what: str, directory: Path | None = None) -> StorageError:
    """Translate an OSError once; a full disk is its own, transient, error."""
    if err.errno in _FULL_ERRNOS:
        return StorageFull(f"{what}: {err.strerror}", directory, err.errno)
    return StorageError(f"{what}: {err}", directory, err.errno)


# -- walking below a root ---------------------------------------------------------------------


def split_rel(rel: str) -> list[str]:
    """``a/b/c.txt`` -> ["a", "b", "c.txt"]; ValueError for anything that could climb out.

    >>> split_rel("2026/report.pdf")
    ['2026', 'report.pdf']
    """
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ValueError(f"not a plain relative path: {rel!r}")
    return parts


def open_root(path: str | Path) -> int:
    """An operator-configured directory, opened by path (symlinks the operator made are fine)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_beneath(root_fd: int, parts: Sequence[str]) -> int:
    """The directory ``parts`` below ``root_fd``, never through a symlink; a new fd to close.

    NotADirectoryError when a component is a symlink or not a directory (O_NOFOLLOW with
    O_DIRECTORY reports both as ENOTDIR), FileNotFoundError when one is missing.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(root: str | Path, parts: Sequence[str]) -> int:
    """The directory holding ``parts[-1]`` below the directory ``root``: an fd to close.

    Like `open_beneath` from a root opened by path, one dup() and close() cheaper (this is on
    every file's way).
    """
    fd = open_root(root)
    try:
        for part in parts[:-1]:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dirs_beneath(
    root_fd: int, parts: Sequence[str], mode: int = 0o755, *, rename_clashes: bool = True
) -> tuple[int, list[str]]:
    """Open the directory ``parts`` below ``root_fd``, making what is missing.

    A component whose name is taken by a file or a symlink is never followed or replaced: the
    directory goes under ``name (1)``, ``name (2)``, ... instead (or, without
    ``rename_clashes``, NotADirectoryError). Returns the fd (to close) and the names used.
    """
    fd = os.dup(root_fd)
    used: list[str] = []
    try:
        for part in parts:
            child, name = _make_dir(fd, part, mode, _MAX_CLASHES if rename_clashes else 1)
            os.close(fd)
            fd = child
            used.append(name)
    except BaseException:
        os.close(fd)
        raise
    return fd, used


def _make_dir(parent_fd: int, part: str, mode: int, candidates: int) -> tuple[int, str]:
    names = noclobber_names(part)
    for n in range(candidates):
        name = names(n)
        for _ in range(3):  # made, then removed by someone before we opened it: try again
            try:
                return os.open(name, DIR_FLAGS, dir_fd=parent_fd), name
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=parent_fd)
            except NotADirectoryError:
                break  # a file or a symlink holds the name: the next candidate
    raise NotADirectoryError(errno.ENOTDIR, "taken by a file or a symlink", part)


def lstat_beneath(root_fd: int, parts: Sequence[str]) -> os.stat_result:
    """lstat of ``parts`` below ``root_fd`` without following a symlink on the way."""
    parent = open_beneath(root_fd, parts[:-1])
    try:
        return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


# -- moving without overwriting ---------------------------------------------------------------


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Atomically rename, raising FileExistsError if ``dst`` exists (renameat2 NOREPLACE).

    Filesystems without RENAME_NOREPLACE fall back to link + unlink, equally no-clobber.
    """
    if _renameat2 is not None:
        rc = _renameat2(
            src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir_fd)


def place_noclobber(
    src_dir_fd: int,
    src_name: str,
    src_fd: int,
    dst_dir_fd: int,
    names: Callable[[int], str],
    *,
    tmp_name: str,
    mode: int,
    before_each: Callable[[str], None] = lambda name: None,
) -> tuple[str, bool]:
    """Give the file ``src_name`` (open as ``src_fd``) the first free name in ``dst_dir_fd``.

    The one no-clobber move of the project. Tried first: a hard link (the source name stays;
    the caller drops it once the new name is durable). Where the kernel refuses a link (EXDEV
    between two mounts even of one filesystem, EPERM for another user's file under
    fs.protected_hardlinks), the bytes are copied to ``tmp_name`` in the destination (holes
    kept, fsynced, ``mode``) and renamed into place without replacing. ``before_each(name)``
    runs before each attempt (to journal where the file is going). Returns (name, copied).
    The destination directory is not fsynced here.
    """
    copied = False
    source_fd, source = src_dir_fd, src_name
    for n in range(_MAX_CLASHES):
        name = names(n)
        before_each(name)
        try:
            if copied:
                rename_noreplace(dst_dir_fd, tmp_name, dst_dir_fd, name)
            else:
                os.link(
                    source, name, src_dir_fd=source_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False
                )
            return name, copied
        except FileExistsError:
            continue
        except OSError as err:
            if copied or err.errno not in (errno.EXDEV, errno.EPERM):
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=dst_dir_fd)  # left by an attempt cut short
            copy_to_new_file(src_fd, dst_dir_fd, tmp_name, mode)
            copied = True
            name = names(n)
            before_each(name)
            try:
                rename_noreplace(dst_dir_fd, tmp_name, dst_dir_fd, name)
                return name, copied
            except FileExistsError:
                continue
    raise OSError(errno.EEXIST, "no free name", names(0))


def copy_to_new_file(src_fd: int, dir_fd: int, name: str, mode: int = 0o600) -> None:
    """Copy into ``name``, which must not exist yet (O_EXCL, O_NOFOLLOW), holes kept; fsync it."""
    out = os.open(name, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        copy_sparse(src_fd, out)
        os.fchmod(out, mode)  # the umask may have taken bits away
        provenance.copy(src_fd, out)  # a delivered copy keeps its user.watcher.* attributes
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(out)


def copy_sparse(src_fd: int, dst_fd: int) -> None:
    """Copy a whole file, keeping its holes: a sparse upload is never expanded on our disk."""
    size = os.fstat(src_fd).st_size
    in_kernel = True
    for start, end in data_extents(src_fd, size):
        offset = start
        while offset < end:
            length = min(end - offset, COPY_CHUNK_BYTES if not in_kernel else 1 << 30)
            if in_kernel:
                try:
                    copied = os.copy_file_range(src_fd, dst_fd, length, offset, offset)
                except OSError as err:  # EXDEV: some kernels copy only within a filesystem
                    if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    in_kernel = False
                    continue
            else:
                chunk = os.pread(src_fd, length, offset)
                copied = len(chunk)
                view = memoryview(chunk)
                at = offset
                while view:
                    written = os.pwrite(dst_fd, view, at)
                    view, at = view[written:], at + written
            if copied == 0:  # the file shrank under us: what we have is what we copy
                break
            offset += copied
    os.ftruncate(dst_fd, size)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each region holding data; the whole file where holes can't be told."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole from here on
                return
            if err.errno != errno.EINVAL:
                raise
            start, end = offset, size  # SEEK_DATA unsupported: treat it all as data
        yield start, min(end, size)
        offset = end


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(
    path: Path, data: bytes, mode: int = 0o600, dir_fd: int | None = None
) -> None:
    """Write a small record under a temp name and rename it into place (readers never see half)."""
    name = path.name if dir_fd is not None else str(path)
    tmp = f".{path.name}.tmp" if dir_fd is not None else str(path.with_name(f".{path.name}.tmp"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def noclobber_names(name: str) -> Callable[[int], str]:
    """``report.pdf`` -> ``report (1).pdf``; keeps the whole name within 255 bytes."""
    stem, dot, ext = name.rpartition(".")
    if not stem or len(ext) > 16:
        stem, dot, ext = name, "", ""

    def nth(n: int) -> str:
        if n == 0:
            return name
        tail = f" ({n}){dot}{ext}"
        room = MAX_NAME_BYTES - len(os.fsencode(tail))
        return os.fsdecode(os.fsencode(stem)[:room]) + tail

    return nth


# -- reading --------------------------------------------------------------------------------


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


# -- leases: who else may write -----------------------------------------------------------------


def leases_handled() -> bool:
    """Leases signal SIGIO to their holder on a break; unhandled, that signal kills us."""
    return signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, None)


def take_read_lease(fd: int) -> bool:
    """A read lease on ``fd``'s file, or False where none can be had.

    The kernel grants one only while nobody has the file open for writing (any process, any
    fd, any writable shared mapping), and only to the file's owner or a holder of CAP_LEASE.
    While held, anyone opening the file for writing is made to wait (fs.lease-break-time, 45 s)
    and `lease_broken` turns true: no fd can come to write the file without our knowing.
    """
    if not leases_handled():
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False  # EAGAIN a writer holds it, EACCES not ours, EINVAL no leases here
    return True


def lease_broken(fd: int) -> bool:
    """Someone asked to open the leased file for writing (they wait until we let go)."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK)
    except OSError:
        return True


def release_lease(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def writer_active(dir_fd: int, name: str) -> bool | None:
    """Is anyone holding ``name`` (in ``dir_fd``) open for writing? None when we can't tell.

    Asked with a read lease, taken and dropped at once (see `take_read_lease`).
    """
    if not leases_handled():
        return None
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return None  # never open a device, FIFO or socket just to ask
        fd = os.open(name, OPEN_UPLOAD_FLAGS, dir_fd=dir_fd)
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
