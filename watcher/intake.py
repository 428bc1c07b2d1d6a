"""Finding uploads: watchdog events as hints, a settle gate, and sweeps that miss nothing.

Events are only hints. A file is offered to the queue once it is complete: nobody holds it
open for writing (asked of the kernel with a read lease where it can tell), or its size and
mtime have not changed for ``settle_s``. Sweeps (at start, periodically, after a dropped hint
and for each new directory) recover whatever inotify missed or overflowed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from watcher.fsops import (
    lstat_beneath,
    open_beneath,
    open_parent,
    open_root,
    relative_to,
    split_rel,
    writer_active,
)
from watcher.inotify import IntakeObserver
from watcher.logs import emit

Offer = Callable[[Path], bool]


class Intake:
    def __init__(
        self,
        uploads_dir: Path,
        offer: Offer,
        has_room: Callable[[], bool],
        *,
        ignore_patterns: tuple[str, ...],
        settle_s: float,
        sweep_interval_s: float,
        polling: bool = False,
        poll_interval_s: float = 2.0,
        skip_dirs: tuple[Path, ...] = (),
        skip_identity: Callable[[], tuple[int, int] | None] = lambda: None,
        max_depth: int = 64,
        owns: Callable[[str], bool] = lambda rel: True,
        after_full_sweep: Callable[[], None] | None = None,
    ) -> None:
        self.uploads_dir = uploads_dir
        self._offer = offer
        self._has_room = has_room
        self._after_full_sweep = after_full_sweep
        # One regex for all the globs: fnmatch per pattern per path part showed in profiles.
        self._ignore = re.compile("|".join(fnmatch.translate(p) for p in ignore_patterns) or "(?!)")
        self._settle_s = settle_s
        self._sweep_interval_s = sweep_interval_s
        self._polling = polling
        self._poll_interval_s = poll_interval_s
        self._skip = {str(p) for p in skip_dirs}
        self._skip_identity = skip_identity  # our staging directory, wherever it was renamed
        self.max_depth = max_depth
        self._owns = owns  # this process's share of uploads (see daemon.Partition)
        self._pending: dict[str, tuple[int, int, float]] = {}
        self._cond = threading.Condition()
        self._sweep_requests: set[Path] = set()
        self._overflowed = threading.Event()
        self._sweep_due = threading.Event()
        self._stopping = threading.Event()
        self._observer: BaseObserver | None = None
        self._threads: list[threading.Thread] = []
        self.sweeps = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        observer: BaseObserver = (
            PollingObserver(timeout=self._poll_interval_s)
            if self._polling
            else IntakeObserver(
                self._skip_watch, self.max_depth, self._file_event, self._events_lost
            )
        )
        observer.schedule(
            _Handler(self, tuple(self._skip)),
            str(self.uploads_dir),
            recursive=True,
            event_filter=_WANTED_EVENTS,
        )
        observer.start()
        self._observer = observer
        for target, name in ((self._settle_loop, "settle"), (self._sweep_loop, "sweep")):
            thread = threading.Thread(target=target, name=f"watcher-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.request_sweep()  # files that were there before we started produce no events

    def stop(self) -> None:
        self._stopping.set()
        self._sweep_due.set()
        with self._cond:
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def alive(self) -> bool:
        observer = self._observer
        if isinstance(observer, IntakeObserver):
            observer_ok = observer.alive()
        else:
            observer_ok = observer is not None and observer.is_alive()
        return observer_ok and all(t.is_alive() for t in self._threads)

    def _skip_watch(self, path: bytes) -> bool:
        """Never watch our staging directory (by name, or by identity if it was renamed)."""
        decoded = os.fsdecode(path)
        if any(decoded == p or decoded.startswith(p + os.sep) for p in self._skip):
            return True
        identity = self._skip_identity()
        if identity is None:
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == identity

    def request_sweep(self, directory: Path | None = None) -> None:
        with self._cond:
            self._sweep_requests.add(directory or self.uploads_dir)
        self._sweep_due.set()

    def _file_event(self, path: bytes, complete: bool) -> None:
        """From watchdog's inotify thread (see watcher/inotify.py): never raise into it."""
        try:
            self.hint(Path(os.fsdecode(path)), complete)
        except Exception:
            emit("intake.event_failed", exception=True)

    def _events_lost(self) -> None:
        """The kernel's event queue overflowed: only a sweep finds what it dropped."""
        emit("intake.events_lost")
        self.request_sweep()

    # -- hints --------------------------------------------------------------------------

    def hint(self, path: Path, complete: bool) -> None:
        """A file may be ready. ``complete``: the event itself says its writer is done."""
        if self.ignored(path) or not self._owns(relative_to(path, self.uploads_dir) or ""):
            return
        if not complete and str(path) in self._pending:
            self._watch(path)  # already waiting to settle: just note its size
            return
        active = self._writer_active(path)
        if active is False or (complete and active is None):
            self._ready(path)
        else:
            self._watch(path)

    def _parent(self, path: Path) -> tuple[int, str] | None:
        """(fd of the directory holding `path`, its name), walked from the uploads root
        without following a symlink; None where that cannot be done (the pipeline decides)."""
        rel = relative_to(path, self.uploads_dir)
        try:
            parts = split_rel(rel or "")
            if len(parts) > self.max_depth:
                return None
            return open_parent(self.uploads_dir, parts), parts[-1]
        except (OSError, ValueError):
            return None

    def _writer_active(self, path: Path) -> bool | None:
        parent = self._parent(path)
        if parent is None:
            return None
        fd, name = parent
        try:
            return writer_active(fd, name)
        finally:
            os.close(fd)

    def _lstat(self, path: Path) -> os.stat_result | None:
        parent = self._parent(path)
        if parent is None:
            return None
        fd, name = parent
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)

    def ignored(self, path: Path) -> bool:
        rel = relative_to(path, self.uploads_dir)
        if rel is None or any(
            str(path) == skip or str(path).startswith(skip + os.sep) for skip in self._skip
        ):
            return True
        return any(self._ignore.match(part) for part in rel.split(os.sep))

    def _ready(self, path: Path) -> None:
        with self._cond:
            self._pending.pop(str(path), None)
        if not self._offer(path):
            self._overflowed.set()  # the file stays in uploads; a sweep finds it later
            self._sweep_due.set()

    def _watch(self, path: Path) -> None:
        st = self._lstat(path)
        if st is None:
            self._ready(path)  # unreachable or too deep: the pipeline says why, once
            return
        with self._cond:
            key = str(path)
            previous = self._pending.get(key)
            if previous is None or previous[:2] != (st.st_size, st.st_mtime_ns):
                self._pending[key] = (st.st_size, st.st_mtime_ns, time.monotonic())
            self._cond.notify_all()

    def _settle_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                while not self._pending and not self._stopping.is_set():
                    self._cond.wait()  # idle: no polling at all
                snapshot = list(self._pending.items())
            for key, (size, mtime_ns, since) in snapshot:
                self._check_settled(Path(key), size, mtime_ns, since)
            self._stopping.wait(min(self._settle_s / 4, 0.5))

    def _check_settled(self, path: Path, size: int, mtime_ns: int, since: float) -> None:
        st = self._lstat(path)
        if st is None:
            with self._cond:
                self._pending.pop(str(path), None)
            return
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            self._watch(path)
            return
        active = self._writer_active(path)
        if active is False or (active is None and time.monotonic() - since >= self._settle_s):
            self._ready(path)

    # -- sweeps -------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            self._sweep_due.wait(self._sweep_interval_s)
            self._sweep_due.clear()
            if self._overflowed.is_set():
                # Hints were dropped: sweep once the queue has drained to half, not before,
                # or we would walk the whole tree again for every file that did not fit.
                while not self._has_room() and not self._stopping.wait(0.1):
                    pass
                self._overflowed.clear()
                self.request_sweep()
                self._sweep_due.clear()
            if self._stopping.is_set():
                return
            with self._cond:
                requests, self._sweep_requests = self._sweep_requests, set()
            roots = sorted(requests) if requests else [self.uploads_dir]
            if self.uploads_dir in requests:
                roots = [self.uploads_dir]
            try:
                for root in roots:
                    self._sweep(root)
                if roots == [self.uploads_dir] and self._after_full_sweep is not None:
                    self._after_full_sweep()
            except Exception:
                emit("intake.sweep_failed", exception=True)

    def _sweep(self, root: Path) -> None:
        found = 0
        now_ns = time.time_ns()
        for path, st in self.walk(root):
            if self._overflowed.is_set():
                break  # the queue is full: the rest waits for the next sweep
            if not self._owns(relative_to(path, self.uploads_dir) or ""):
                continue  # another scan process's
            found += 1
            if str(path) in self._pending:
                continue
            if not stat.S_ISREG(st.st_mode):
                self._ready(path)  # the pipeline rejects it (once, loudly)
            else:
                complete = now_ns - st.st_mtime_ns >= self._settle_s * 1e9
                self.hint(path, complete=complete)
        self.sweeps += 1
        emit("intake.swept", root=str(root), files=found)

    def walk(self, root: Path | None = None) -> Iterator[tuple[Path, os.stat_result]]:
        """Every entry below `root` (default: uploads) that is not a directory, and each
        directory at the depth limit (what it holds is too deep); with its lstat.

        Without recursion, one directory at a time from the uploads root, never through a
        symlink (each directory is opened with O_NOFOLLOW below its parent's fd), never into
        our staging directory, ignored names left out. Directories are read as we go, not
        listed first: a sweep after a burst stops at the first file the queue has no room
        for, and a list of every entry of a 50,000-file directory was most of the daemon's
        peak memory.
        """
        start = relative_to(root, self.uploads_dir) if root and root != self.uploads_dir else ""
        if start is None:
            return
        try:
            uploads_fd = open_root(self.uploads_dir)
        except OSError:
            return
        try:
            stack = [start]
            while stack:
                rel_dir = stack.pop()
                yield from self._walk_dir(uploads_fd, rel_dir, stack)
        finally:
            os.close(uploads_fd)

    def _walk_dir(
        self, uploads_fd: int, rel_dir: str, stack: list[str]
    ) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            parts = split_rel(rel_dir) if rel_dir else []
            if any(self._ignore.match(p) for p in parts):
                return
            if len(parts) >= self.max_depth:  # a sweep asked for at the limit: not read
                yield Path(self.uploads_dir, rel_dir), lstat_beneath(uploads_fd, parts)
                return
            dir_fd = open_beneath(uploads_fd, parts)
        except (OSError, ValueError):
            return  # gone, swapped for a symlink, or not ours to read
        try:
            skip = self._skip_identity()
            depth = len(parts) + 1  # of the entries in this directory
            dev = os.fstat(dir_fd).st_dev
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    if self._ignore.match(entry.name):
                        continue
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    path = Path(self.uploads_dir, rel)
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if (dev, entry.inode()) == skip or str(path) in self._skip:
                                continue
                            if depth < self.max_depth:
                                stack.append(rel)
                                continue
                        yield path, entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
        finally:
            os.close(dir_fd)


# Only what can announce a new file. Opens, reads, modifications and deletions are left out of
# the inotify mask: they are most of the traffic and say nothing a settle check doesn't.
_WANTED_EVENTS = [
    FileCreatedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: only hands hints over, and never lets an exception escape.

    With inotify only directory events come this way (file events come straight from
    watcher/inotify.py); with polling, every event.
    """

    def __init__(self, intake: Intake, skip: tuple[str, ...]) -> None:
        self._intake = intake
        self._skip_prefixes = tuple(p + os.sep for p in skip)

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = os.fsdecode(event.dest_path or event.src_path)
        if path.startswith(self._skip_prefixes):
            return  # our own staging area
        try:
            self._dispatch(event)
        except Exception:
            emit("intake.event_failed", exception=True)

    def _dispatch(self, event: FileSystemEvent) -> None:
        # Only the types in _WANTED_EVENTS reach us (watchdog applies the event filter).
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            target = event.dest_path if isinstance(event, DirMovedEvent) else event.src_path
            self._intake.request_sweep(Path(os.fsdecode(target)))
        elif isinstance(event, FileMovedEvent):
            self._intake.hint(Path(os.fsdecode(event.dest_path)), complete=True)
        elif isinstance(event, FileCreatedEvent):
            self._intake.hint(Path(os.fsdecode(event.src_path)), complete=False)
        elif isinstance(event, FileClosedEvent):
            self._intake.hint(Path(os.fsdecode(event.src_path)), complete=True)
