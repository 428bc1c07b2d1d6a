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

from loguru import logger
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

from watcher.fsops import relative_to, writer_active
from watcher.inotify import IntakeObserver

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
            else IntakeObserver(tuple(self._skip), self._file_event, self._events_lost)
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
        observer_ok = self._observer is not None and self._observer.is_alive()
        return observer_ok and all(t.is_alive() for t in self._threads)

    def request_sweep(self, directory: Path | None = None) -> None:
        with self._cond:
            self._sweep_requests.add(directory or self.uploads_dir)
        self._sweep_due.set()

    def _file_event(self, path: bytes, complete: bool) -> None:
        """From watchdog's inotify thread (see watcher/inotify.py): never raise into it."""
        try:
            self.hint(Path(os.fsdecode(path)), complete)
        except Exception:
            logger.bind(event="intake.event_failed").exception("event handling failed")

    def _events_lost(self) -> None:
        """The kernel's event queue overflowed: only a sweep finds what it dropped."""
        logger.bind(event="intake.events_lost").warning("inotify queue overflowed: sweeping")
        self.request_sweep()

    # -- hints --------------------------------------------------------------------------

    def hint(self, path: Path, complete: bool) -> None:
        """A file may be ready. ``complete``: the event itself says its writer is done."""
        if self.ignored(path):
            return
        if not complete and str(path) in self._pending:
            self._watch(path)  # already waiting to settle: just note its size
            return
        active = writer_active(path)
        if active is False or (complete and active is None):
            self._ready(path)
        else:
            self._watch(path)

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
        try:
            st = os.lstat(path)
        except FileNotFoundError:
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
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with self._cond:
                self._pending.pop(str(path), None)
            return
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            self._watch(path)
            return
        active = writer_active(path)
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
                logger.bind(event="intake.sweep_failed").exception("sweep failed")

    def _sweep(self, root: Path) -> None:
        found = 0
        now_ns = time.time_ns()
        for path, st in self._walk(root):
            if self._overflowed.is_set():
                break  # the queue is full: the rest waits for the next sweep
            found += 1
            if str(path) in self._pending:
                continue
            if not stat.S_ISREG(st.st_mode):
                self._ready(path)  # the pipeline rejects it (once, loudly)
            else:
                complete = now_ns - st.st_mtime_ns >= self._settle_s * 1e9
                self.hint(path, complete=complete)
        self.sweeps += 1
        logger.bind(event="intake.swept", root=str(root), files=found).debug("swept")

    def _walk(self, root: Path) -> Iterator[tuple[Path, os.stat_result]]:
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            # Read as we go, not listed first: a sweep after a burst stops at the first file
            # the queue has no room for, and a list of every entry of a 50,000-file directory
            # was most of the daemon's peak memory.
            with entries:
                for entry in entries:
                    path = Path(entry.path)
                    if entry.path in self._skip or self.ignored(path):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(path)
                        else:
                            yield path, entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue


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
            logger.bind(event="intake.event_failed").exception("event handling failed")

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
