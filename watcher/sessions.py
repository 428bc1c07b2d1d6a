"""A bounded pool of clamd IDSESSION connections that gives clamd's capacity back.

clamd (1.4, clamd/server-th.c) polls every connection that may still send a command, and
stops accepting new ones while MaxQueue of them are open: later clients wait unaccepted in the
listen backlog, whatever they are (another replica's session, the app, a health check's PING).
A connection with a single command leaves that set once the command is read; an IDSESSION
connection stays in it until it closes, busy or idle. So sessions held open starve everyone
else, and four replicas keeping one per worker thread collapsed to a few files a second, each
new connection waiting out the 120 s scan timeout.

The invariants here:
- at most `limit` sessions are open (leased or pooled), `limit` being clamd's MaxThreads:
  more requests in flight would only queue inside clamd;
- a pooled session idle for `idle_s` is closed within `idle_s` more (a reaper thread that
  exists only while sessions do), so an idle daemon holds no connection;
- a session older than its maximum age (`max_age_s`, jittered down to half so that sessions
  opened together do not expire together) is closed when given back: even while every session
  is busy, one closes every so often and lets the client at the head of clamd's backlog in;
- a session is either pooled or leased to exactly one thread; only pooled or returned sessions
  are closed here, never one in use.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Closeable(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Closeable)


class SessionPool(Generic[S]):
    """`lease` a pooled session or `open` a new one; `give_back` after a clean exchange,
    `discard` after a failed one."""

    def __init__(
        self,
        open_session: Callable[[], S],
        limit: Callable[[], int | None],
        idle_s: float,
        max_age_s: float,
        fallback_limit: int = 4,
    ) -> None:
        self._open_session = open_session
        self._ask_limit = limit  # asked until it answers, then kept
        self._limit: int | None = None
        self.fallback_limit = fallback_limit
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._idle: list[tuple[S, float]] = []  # (session, when last given back), LIFO
        self._expires: dict[int, float] = {}  # id(session) → when it is too old to pool
        self._reaper: threading.Thread | None = None

    @property
    def open_count(self) -> int:
        """Sessions open now, leased or pooled."""
        return len(self._expires)

    def limit(self) -> int:
        """Sessions that may be open at once: what `limit` told, `fallback_limit` until then."""
        if self._limit is None:
            self._limit = self._ask_limit()
            if self._limit is None:
                return self.fallback_limit
        return self._limit

    def lease(self) -> S | None:
        """The most recently used pooled session, or None: then `open` one."""
        stale = []
        with self._lock:
            now = time.monotonic()
            while self._idle:
                session, used = self._idle.pop()
                if now - used <= self.idle_s:
                    return session
                stale.append(self._forget(session))
        _close_all(stale)
        return None

    def open(self) -> S | None:
        """A new session, or None when `limit` are open (the caller goes without)."""
        limit = self.limit()
        with self._lock:
            if len(self._expires) >= limit:
                return None
            token = object()  # holds the slot while connecting, outside the lock
            self._expires[id(token)] = 0.0
        try:
            session = self._open_session()
        except BaseException:
            with self._lock:
                del self._expires[id(token)]
            raise
        jitter = 0.5 + random.random() / 2  # noqa: S311 (spreading expiries, not a secret)
        with self._lock:
            del self._expires[id(token)]
            self._expires[id(session)] = time.monotonic() + self.max_age_s * jitter
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name="clamd-session-reaper", daemon=True
                )
                self._reaper.start()
        return session

    def give_back(self, session: S) -> None:
        """After a complete exchange: pooled for the next lease, or closed if too old."""
        with self._lock:
            now = time.monotonic()
            if now < self._expires.get(id(session), now):
                self._idle.append((session, now))
                return
            self._forget(session)
        session.close()

    def discard(self, session: S) -> None:
        """A session that failed: closed, its slot free."""
        with self._lock:
            self._forget(session)
        session.close()

    def close(self) -> None:
        """Close the pooled sessions now; leased ones are closed or pooled when given back."""
        with self._lock:
            idle = [self._forget(session) for session, _ in self._idle]
            self._idle.clear()
        _close_all(idle)

    def _forget(self, session: S) -> S:
        self._expires.pop(id(session), None)
        return session

    def _reap(self) -> None:
        """Close sessions idle too long; end once no session is open (leased or pooled)."""
        while True:
            time.sleep(self.idle_s / 2)
            with self._lock:
                now = time.monotonic()
                keep = [entry for entry in self._idle if now - entry[1] <= self.idle_s]
                stale = [self._forget(s) for s, used in self._idle if now - used > self.idle_s]
                self._idle = keep
                if not self._expires:
                    self._reaper = None
            _close_all(stale)
            if self._reaper is not threading.current_thread():
                return


def _close_all(sessions: list[S]) -> None:
    for session in sessions:
        session.close()
