"""Leases: whether the daemon owning a staging directory lives, as any host can judge it.

Daemons on several hosts share the uploads volume (NFS, EFS, CephFS); flock, pids and the
like are only true on one host (on NFS mounted ``nolock`` every host "gets" every lock). So
each daemon's staging directory holds a file ``lease`` whose timestamps the owner renews
every `renew_interval_s` (a sixth of the lease bound, WATCHER_STAGING_LEASE_S). Another
daemon judges the owner dead only when:

- it has seen the lease unchanged (same inode, mtime and ctime) for the whole lease bound, by
  its *own* monotonic clock: no host's clock is compared with another's;
- and, where flock works, the directory's lock is free too (claims.py checks it).

A daemon that stops with claims left renames its lease ``released``: adopted at once.

The lease holds its owner's host (`host_identity`: the kernel's boot id and the host name).
A daemon on that same host (a restart after a crash, the usual case) does not wait for the
bound: one kernel keeps all its locks, so there the free flock alone means its owner is dead.

Taking a lease is a rename of ``lease`` (or ``released``) to ``taken-<adopter>``: a rename
succeeds once, so two daemons that judge one directory dead at once never both adopt it. After
the rename the adopter checks the lease is still the one it saw go stale, and gives it back if
the owner renewed it meanwhile. The owner in turn renews by `futimens` and then checks that
its lease still has its name; if not, it was taken (the owner was frozen, or cut off from the
volume, longer than the bound) and the owner stops. Until then it claims and delivers only
while its last renewal is less than half the bound old (`OwnLease.held`): an adopter cannot
act before the full bound has passed since that renewal.

Timestamps are read through a fresh `open()`: on NFS that revalidates the attributes
(close-to-open consistency) instead of reading an attribute cache up to a minute old.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from watcher.logs import emit

LEASE = "lease"
RELEASED = "released"
TAKEN = "taken-"
RENEWALS_PER_LEASE = 6
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# What an observer sees of a directory's lease: its (inode, mtime, ctime) while it is held,
# RELEASED after a clean stop, ABSENT when there is none (taken by an adopter that died
# half-way, or made by a watcher older than leases), None when it cannot be read now.
Stamp = tuple[int, int, int] | str | None
ABSENT = "absent"

Clock = Callable[[], float]


def renew_interval_s(lease_s: float) -> float:
    """How often an owner renews its lease (and watches the others').

    >>> renew_interval_s(30.0)
    5.0
    """
    return lease_s / RENEWALS_PER_LEASE


def host_identity() -> str | None:
    """This kernel's boot and this host's name; None where unknown (never the same host).
    Two containers on one node differ by name (their UTS namespaces): conservative."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read(64).strip().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    return f"{boot} {os.uname().nodename}" if boot else None


def owner_host(dir_fd: int, name: str) -> str | None:
    """The host written into directory `name`'s lease by its owner; None if unknown."""
    try:
        fd = os.open(f"{name}/{LEASE}", _FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 512).decode("utf-8", "replace") or None
    except OSError:
        return None
    finally:
        os.close(fd)


def _stamp_of(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def read_stamp(dir_fd: int, name: str) -> Stamp:
    """The stamp of the lease in directory `name` (under `dir_fd`), read afresh."""
    try:
        fd = os.open(f"{name}/{LEASE}", _FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        try:
            os.stat(f"{name}/{RELEASED}", dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return ABSENT
        except OSError:
            return None
        return RELEASED
    except OSError:
        return None
    try:
        return _stamp_of(os.fstat(fd))
    finally:
        os.close(fd)


class OwnLease:
    """The owner's side: created with the directory, renewed, released at a clean stop."""

    def __init__(self, lease_s: float, clock: Clock = time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._dir_fd = -1
        self._fd = -1
        self._renewed_at = float("-inf")
        self.lost = False
        self._lock = threading.Lock()

    def create(self, dir_fd: int) -> None:
        """Before the directory gets its `d-*` name: it never appears without a lease."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(LEASE, flags, 0o600, dir_fd=dir_fd)
        host = host_identity()
        if host is not None:
            os.write(self._fd, host.encode())
        self._dir_fd = dir_fd
        self._renewed_at = self._clock()

    def renew(self) -> bool:
        """Move the lease's timestamps; False once it was taken (then never renewed again)."""
        with self._lock:
            if self.lost or self._fd < 0:
                return False
            started = self._clock()  # the renewal counts from before the write, not after
            os.utime(self._fd)  # now, as the filesystem stamps it (NFS: the server's clock)
            if not self._still_ours():
                self.lost = True
                return False
            self._renewed_at = started
            return True

    def held(self) -> bool:
        """Renewed recently enough to act: nobody may adopt us for at least half the bound."""
        return not self.lost and self._clock() - self._renewed_at < self.lease_s / 2

    def release(self) -> None:
        """A clean stop with claims left: others may adopt them at once."""
        with self._lock:
            if self._fd < 0:
                return
            if not self.lost:
                with contextlib.suppress(OSError):
                    os.rename(LEASE, RELEASED, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self.lost = True  # nothing is claimed or delivered from here on

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _still_ours(self) -> bool:
        try:
            st = os.stat(LEASE, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class LeaseWatch:
    """The others' side: since when (by our clock) each directory's lease has not moved."""

    def __init__(self, lease_s: float, clock: Clock = time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._seen: dict[str, tuple[Stamp, float]] = {}

    def expired(self, name: str, stamp: Stamp) -> bool:
        """True when the lease was released, or has shown `stamp` for the whole bound."""
        if stamp is None:
            return False  # unreadable right now: neither alive nor dead, look again later
        now = self._clock()
        seen = self._seen.get(name)
        if seen is None or seen[0] != stamp:
            self._seen[name] = (stamp, now)
            return stamp == RELEASED
        return stamp == RELEASED or now - seen[1] >= self.lease_s

    def keep_only(self, names: set[str]) -> None:
        """Forget directories that are gone."""
        for name in set(self._seen) - names:
            del self._seen[name]


def take(dir_fd: int, name: str, stamp: Stamp, taker: str) -> bool:
    """Take the expired lease of directory `name`; False if someone else did, or the owner
    renewed it after all (then it is given back)."""
    taken = f"{name}/{TAKEN}{taker}"
    if stamp == ABSENT:
        # Nothing to rename: make a lease (one maker wins) and take that.
        try:
            made = os.open(f"{name}/{LEASE}", _FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except OSError:
            return False
        os.close(made)
        os.rename(f"{name}/{LEASE}", taken, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    source = RELEASED if stamp == RELEASED else LEASE
    try:
        os.rename(f"{name}/{source}", taken, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        return False  # another daemon took it first, or the directory is gone
    if stamp == RELEASED:
        return True
    try:
        fd = os.open(taken, _FLAGS, dir_fd=dir_fd)
        try:
            # Inode and mtime: the rename itself moved the ctime.
            unchanged = _stamp_of(os.fstat(fd))[:2] == stamp[:2]  # type: ignore[index]
        finally:
            os.close(fd)
    except OSError:
        unchanged = False
    if not unchanged:  # renewed between our last look and the rename: alive after all
        with contextlib.suppress(OSError):
            os.rename(taken, f"{name}/{LEASE}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return unchanged


class LeaseKeeper:
    """A thread that renews our lease and watches the others' every `interval_s`.

    `renew()` False: our lease was taken, `on_lost()` is called once and the thread ends.
    `orphans_due()` True: some other daemon's lease expired, `on_orphans()` adopts.
    """

    def __init__(
        self,
        interval_s: float,
        renew: Callable[[], bool],
        orphans_due: Callable[[], bool],
        on_orphans: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._interval_s = interval_s
        self._renew = renew
        self._orphans_due = orphans_due
        self._on_orphans = on_orphans
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watcher-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if not self._renew():
                    self._on_lost()
                    return
                if self._orphans_due():
                    self._on_orphans()
            except Exception:
                emit("staging.lease_failed", exception=True)
