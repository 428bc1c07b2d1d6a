"""watchdog's inotify observer, fitted to intake through its own extension points.

Three changes (they rely on watchdog internals, hence the exact pin in pyproject.toml):

- File events go straight from watchdog's inotify reader thread to intake. Through watchdog's
  usual path every file event crossed two more threads and queues, became event objects (plus
  a directory-modified event each), and a file's IN_MOVED_FROM was held for 0.5 s while
  watchdog searched everything it held for a matching MOVED_TO: every claim moves an upload out
  of the tree, so in a burst that search made the event path quadratic. Intake needs only
  where a file appeared (and whether its writer closed it), so a file's MOVED_FROM is dropped
  and the rest are handed over as they come. Directory events still take watchdog's path, so
  its watches follow created, moved and deleted directories.
- Nothing under the staging directory is watched: every event there is our own.
- A kernel queue overflow (events lost) asks intake for a full sweep at once; watchdog by itself
  only rebuilds its watches and tells no handler.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

# (path, complete): complete means the writer closed the file.
FileHint = Callable[[bytes, bool], None]


@dataclass
class _WatchGroup(InotifyWatchGroup):
    skip: tuple[bytes, ...] = ()
    on_file: FileHint = lambda path, complete: None
    on_overflow: Callable[[], None] = lambda: None

    def on_event(self, event: InotifyEvent) -> None:
        if event.is_directory or not (event.is_create or event.is_close_write or event.is_move):
            super().on_event(event)
            return
        if event.is_moved_from:
            return
        with self._lock:
            directory = self._active_callbacks_by_watch.get(event.wd) if self.is_active else None
        if directory is not None:
            self.on_file(os.path.join(directory, event.name), event.is_close_write)

    def _add_callback(self, path: bytes) -> None:
        if any(path == skip or path.startswith(skip + b"/") for skip in self.skip):
            return
        super()._add_callback(path)

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.on_overflow()


class _Emitter(InotifyEmitter):
    def __init__(
        self,
        *args: Any,
        skip: tuple[bytes, ...],
        on_file: FileHint,
        on_overflow: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._skip = skip
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
            on_file=self._on_file,
            on_overflow=self._on_overflow,
        )


class IntakeObserver(BaseObserver):
    """Like watchdog's InotifyObserver, with the emitter above."""

    def __init__(
        self, skip: tuple[str, ...], on_file: FileHint, on_overflow: Callable[[], None]
    ) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(
            _Emitter,
            inotify_fd=self._inotify_fd,
            skip=tuple(os.fsencode(p) for p in skip),
            on_file=on_file,
            on_overflow=on_overflow,
        )

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()
