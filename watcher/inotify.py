"""watchdog's inotify observer, fitted to intake through its own extension points.

Three changes (they rely on watchdog internals, hence the exact pin in pyproject.toml):

- A file's IN_MOVED_FROM is dropped as it arrives. watchdog holds each one for 0.5 s to pair it
  with a MOVED_TO, and looks through everything it holds for every MOVED_TO. Every claim moves
  an upload out of the tree, so in a burst that search made the event path quadratic (a quarter
  of the daemon's CPU in `make bench`). Intake needs only where a file arrived: a file moved
  within the tree is reported as created at its new name. Directory moves are still paired, so
  the watches follow a renamed directory.
- Nothing under the staging directory is watched: every event there is our own.
- A kernel queue overflow (events lost) asks intake for a full sweep at once; watchdog by itself
  only rebuilds its watches and tells no handler.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyFD
from watchdog.observers.inotify_move_event_grouper import (
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)


class _Grouper(InotifyMoveEventGrouper):
    """Pairs directory moves only; a MOVED_TO whose cookie no directory left with is not
    searched for (watchdog searches its whole pending queue, twice, for every one)."""

    def __init__(self) -> None:
        super().__init__()
        self._dir_cookies: set[int] = set()

    def put_event(self, event: PathedInotifyEvent) -> None:
        if event.ev.is_moved_from:
            if not event.ev.is_directory:
                return
            if len(self._dir_cookies) > 10_000:  # those of directories moved out of the tree
                self._dir_cookies.clear()
            self._dir_cookies.add(event.ev.cookie)
        if event.ev.is_moved_to and event.ev.cookie not in self._dir_cookies:
            self._queue.put(event, delay=False)
            return
        self._dir_cookies.discard(event.ev.cookie)
        super().put_event(event)

    def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
        if cookie not in self._dir_cookies:
            return None
        return super().get_queued_moved_from_event(cookie)

    def discard_pending_events(self) -> None:
        self._dir_cookies.clear()
        super().discard_pending_events()


@dataclass
class _WatchGroup(InotifyWatchGroup):
    skip: tuple[bytes, ...] = ()
    on_overflow: Callable[[], None] = lambda: None
    _move_event_grouper: InotifyMoveEventGrouper = field(default_factory=_Grouper, init=False)

    def _add_callback(self, path: bytes) -> None:
        if any(path == skip or path.startswith(skip + b"/") for skip in self.skip):
            return
        super()._add_callback(path)

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.on_overflow()


class _Emitter(InotifyEmitter):
    def __init__(
        self, *args: Any, skip: tuple[bytes, ...], on_overflow: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._skip = skip
        self._on_overflow = on_overflow

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
            skip=self._skip,
            on_overflow=self._on_overflow,
        )


class IntakeObserver(BaseObserver):
    """Like watchdog's InotifyObserver, with the emitter above."""

    def __init__(self, skip: tuple[str, ...], on_overflow: Callable[[], None]) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(
            _Emitter,
            inotify_fd=self._inotify_fd,
            skip=tuple(os.fsencode(p) for p in skip),
            on_overflow=on_overflow,
        )

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()
