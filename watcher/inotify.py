"""watchdog's inotify observer, fitted to intake through its own extension points.

Changes (they rely on watchdog internals, hence the exact pin in pyproject.toml):

- File events go straight from watchdog's inotify reader thread to intake. Through watchdog's
  usual path every file event crossed two more threads and queues, became event objects (plus
  a directory-modified event each), and a file's IN_MOVED_FROM was held for 0.5 s while
  watchdog searched everything it held for a matching MOVED_TO: every claim moves an upload out
  of the tree, so in a burst that search made the event path quadratic. Intake needs only
  where a file appeared (and whether its writer closed it), so a file's MOVED_FROM is dropped
  and the rest are handed over as they come.
- Directory trees are walked without recursion and only to the depth limit (watchdog walks
  them with os.walk, recursive in Python 3.11: ~1,000 nested directories raise RecursionError
  in its reader thread, which then dies and reports nothing more). A new or moved-in directory
  is announced once; intake sweeps it, so watchdog's simulated events for its contents (more
  recursive walks) are not made.
- Nothing under the staging directory is watched: every event there is our own.
- A kernel queue overflow (events lost) asks intake for a full sweep at once; watchdog by itself
  only rebuilds its watches and tells no handler. So does any error in the reader thread,
  which is caught there: that thread must never die.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.events import DirCreatedEvent, DirMovedEvent
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent

from watcher.logs import emit

# (path, complete): complete means the writer closed the file.
FileHint = Callable[[bytes, bool], None]


@dataclass
class _WatchGroup(InotifyWatchGroup):
    skip: Callable[[bytes], bool] = lambda path: False
    max_depth: int = 64
    on_file: FileHint = lambda path, complete: None
    on_overflow: Callable[[], None] = lambda: None

    def on_event(self, event: InotifyEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # this is the reader thread: log, sweep, and keep reading
            emit("intake.event_failed", exception=True)
            self.on_overflow()

    def _on_event(self, event: InotifyEvent) -> None:
        if event.is_directory or not (event.is_create or event.is_close_write or event.is_move):
            super().on_event(event)
            return
        if event.is_moved_from:
            return
        with self._lock:
            directory = self._active_callbacks_by_watch.get(event.wd) if self.is_active else None
        if directory is not None:
            self.on_file(os.path.join(directory, event.name), event.is_close_write)

    def _add_all_callbacks(self, path: bytes) -> None:
        """Watch ``path`` and the directories below it to the depth limit, without recursion.

        Directories at the limit are not watched: what they hold is too deep (intake rejects
        them when it sweeps).
        """
        if self.skip(path) or self._depth(path) >= self.max_depth:
            return  # the root of a new tree too: watches never grow past the limit
        self._add_callback(path)
        if not self.is_recursive:
            return
        stack = [path]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    children = [
                        e.path for e in entries if e.is_dir(follow_symlinks=False)
                    ]  # never through a symlink
            except OSError:
                continue
            for child in children:
                if self._depth(child) >= self.max_depth or self.skip(child):
                    continue
                self._add_callback(child)
                stack.append(child)

    def _depth(self, path: bytes) -> int:
        """Levels below the watched root: a directory directly in it is level 1."""
        return path[len(self.path) :].count(b"/")

    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        return []  # intake sweeps each new directory itself

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.on_overflow()


class _Emitter(InotifyEmitter):
    def __init__(
        self,
        *args: Any,
        skip: Callable[[bytes], bool],
        max_depth: int,
        on_file: FileHint,
        on_overflow: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._skip = skip
        self._max_depth = max_depth
        self._on_file = on_file
        self._on_overflow = on_overflow

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
            skip=self._skip,
            max_depth=self._max_depth,
            on_file=self._on_file,
            on_overflow=self._on_overflow,
        )

    def queue_events(self, timeout: float, *, full_events: bool = False) -> None:
        try:
            super().queue_events(timeout, full_events=full_events)
        except Exception:  # the emitter thread must not die either
            emit("intake.event_failed", exception=True)
            self._on_overflow()

    def build_and_queue_event(
        self, event: GroupedInotifyEvent, *, full_events: bool = False
    ) -> None:
        """Directory events only (file events went to intake already): one event per new or
        moved-in directory, none for its contents (watchdog would walk them recursively)."""
        if isinstance(event, PathedInotifyEvent):
            if event.ev.is_directory and (event.ev.is_create or event.ev.is_moved_to):
                self.queue_event(DirCreatedEvent(self._decode_path(event.path)))
            return
        move_from, move_to = event
        if move_from.ev.is_directory:
            src, dest = self._decode_path(move_from.path), self._decode_path(move_to.path)
            self.queue_event(DirMovedEvent(src, dest))


class IntakeObserver(BaseObserver):
    """Like watchdog's InotifyObserver, with the emitter above."""

    def __init__(
        self,
        skip: Callable[[bytes], bool],
        max_depth: int,
        on_file: FileHint,
        on_overflow: Callable[[], None],
    ) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(
            _Emitter,
            inotify_fd=self._inotify_fd,
            skip=skip,
            max_depth=max_depth,
            on_file=on_file,
            on_overflow=on_overflow,
        )

    def alive(self) -> bool:
        """Every thread events depend on: the dispatcher, the reader and the emitters."""
        emitters = self.emitters
        return (
            self.is_alive()
            and self._inotify_fd.is_alive()
            and bool(emitters)
            and all(e.is_alive() for e in emitters)
        )

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()
