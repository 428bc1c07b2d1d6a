"""The HTTP server under the API: every connection, wait, deadline and log line is bounded.

- At most `max_connections` client sockets are open (one more for a moment, while it displaces
  another); beyond, connections wait in the kernel's backlog. The bound is cut to half the
  descriptors still free when the server starts (RLIMIT_NOFILE): however many clients come,
  the daemon keeps the other half for its files and clamd.
- A request head must be complete within `header_timeout_s` of the connection's start (or of
  the previous answer, when kept alive), and an answer must be taken by the client within as
  long; past that: 408 (if part of a head came) and close. Trickling bytes gains nothing.
- When every place is taken, a new connection displaces the one whose head has been arriving
  longest: a flood of slow heads cannot lock out a probe that sends its request at once.
- At most `max_waiters` requests are held on ``?wait`` (at most half the connections); one
  more is answered 503 at once. A held request holds no thread: it is looked up again when its
  own path's verdict is recorded, and at its deadline.
- /healthz is answered on the loop itself; readiness, metrics and lookups on a small pool.
- Every error is an answer (4xx/5xx, JSON) and one JSON log line (`logs.LogBudget`: at most
  ten a second per event). A client that leaves is closed quietly. Nothing here prints.

One thread runs a selector loop over non-blocking sockets (watcher/httpconn.py holds each
connection's h11 state); the pool's results and verdict wake-ups reach it through a queue and
an eventfd.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import resource
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from watcher.logs import LogBudget
from watcher.ops.api import Answer, Backend, Call, Hold, error_answer, route
from watcher.ops.connection import BadHead, Conn, Gone, Phase

POOL_THREADS = 4  # readiness (a clamd PING), metrics, lookups
BACKLOG = 128
ACCEPTS_PER_TURN = 64
MIN_CONNECTIONS = 8  # even on a tight RLIMIT_NOFILE: probes must get in
ACCEPT_PAUSE_S = 0.5  # after EMFILE/ENFILE on accept(): let the kernel queue them meanwhile
TICK_S = 1.0


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_waiters: int
    header_timeout_s: float

    def fitted(self) -> Limits:
        """Cut to the descriptors this process can spare; waiters to half the connections
        (the other half stays free for probes and lookups)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        connections = self.max_connections
        if soft != resource.RLIM_INFINITY:
            spare = (soft - len(os.listdir("/proc/self/fd"))) // 2
            connections = max(MIN_CONNECTIONS, min(connections, spare))
        waiters = max(1, min(self.max_waiters, connections // 2))
        return Limits(connections, waiters, self.header_timeout_s)


class HttpServer:
    def __init__(self, host: str, port: int, backend: Backend, limits: Limits) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self._listener.setblocking(False)
        self.backend = backend
        self.limits = limits
        self.connections = 0  # open client sockets
        self.held = 0  # requests held on ?wait
        self._conns: set[Conn] = set()
        self._heads: dict[Conn, None] = {}  # connections in HEAD phase, longest first
        self._deadlines: list[tuple[float, int, Conn]] = []  # a heap; stale entries skipped
        self._seq = itertools.count()
        self._turns = 0
        self._selector = selectors.DefaultSelector()
        self._inbox: deque[tuple[Conn, str, Any]] = deque()  # from the pool and the daemon
        self._runnable: deque[Conn] = deque()  # kept alive with a pipelined request buffered
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()  # never write the eventfd once it is closed
        self._wake_open = True
        self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="watcher-http-pool")
        self._accepting = False
        self._accept_paused_until = 0.0
        self._accept_failing = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._logs = LogBudget("http.log_suppressed")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.limits = self.limits.fitted()
        self._selector.register(self._wakefd, selectors.EVENT_READ, None)
        self._accept_on()
        self._thread = threading.Thread(target=self._serve, name="watcher-http", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Answer held requests with the state they have, then close every socket."""
        self._closing = True
        if self._thread is not None:
            self._signal()
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self._conns):
            self._close(conn)
        self._listener.close()
        self._selector.close()
        with self._wake_lock:
            if self._wake_open:
                self._wake_open = False
                os.close(self._wakefd)

    # -- the loop -----------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._closing:
            try:
                self._turn()
            except Exception as err:  # never die, never print: one line, then go on
                self._log("http.error", exception=err, path=None)
                time.sleep(0.1)
        self._answer_held_now()

    def _turn(self) -> None:
        self._turns += 1
        self._accept_on()
        accept = False
        for key, mask in self._selector.select(self._timeout(time.monotonic())):
            conn = key.data
            if key.fileobj is self._listener:
                accept = True
            elif conn is None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wakefd)
            elif mask & selectors.EVENT_WRITE:
                self._guarded(conn, self._flush, conn)
            else:
                self._guarded(conn, self._receive, conn)
        while self._inbox:
            conn, kind, payload = self._inbox.popleft()
            self._guarded(conn, self._take, conn, kind, payload)
        for _ in range(len(self._runnable)):
            conn = self._runnable.popleft()
            self._guarded(conn, self._read_requests, conn)
        now = time.monotonic()
        if accept or (self._accept_paused_until and now >= self._accept_paused_until):
            self._accept(now)
        self._expire(now)
        self._logs.flush(now)

    def _timeout(self, now: float) -> float:
        if self._runnable or self._inbox:
            return 0.0
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2].closed or deadlines[0][2].deadline != deadlines[0][0]):
            heapq.heappop(deadlines)  # stale (answered, closed): never wake up for it
        timeout = TICK_S
        if self._deadlines:
            timeout = min(timeout, self._deadlines[0][0] - now)
        if self._accept_paused_until:
            timeout = min(timeout, self._accept_paused_until - now)
        return max(0.0, timeout)

    def _guarded(self, conn: Conn, step: Callable[..., None], *args: Any) -> None:
        """One step for one connection: a client that left is closed quietly; a bug there
        costs that connection, not the loop."""
        if conn.closed:  # closed earlier in this turn
            return
        try:
            step(*args)
        except Gone:
            self._close(conn)
        except Exception as err:
            self._failed(conn, err)
            self._close(conn)

    def _log(self, name: str, **fields: Any) -> None:
        self._logs.log(name, time.monotonic(), **fields)

    def _failed(self, conn: Conn, err: Exception) -> None:
        self._log("http.error", exception=err, path=conn.shown_target())

    # -- connections: accept, displace, expire, close -------------------------------------

    def _accept(self, now: float) -> None:
        self._accept_paused_until = 0.0
        for _ in range(ACCEPTS_PER_TURN):
            if len(self._conns) >= self.limits.max_connections and not self._displaceable():
                break
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ECONNABORTED:
                    continue
                # EMFILE, ENFILE, ENOBUFS: retrying at once would spin; the kernel queues.
                if not self._accept_failing:  # one line per run of failures
                    self._log("http.accept_failed", reason=str(err))
                self._accept_failing = True
                self._accept_off()
                self._accept_paused_until = now + ACCEPT_PAUSE_S
                return
            self._accept_failing = False
            sock.setblocking(False)
            conn = Conn(sock, self._turns)
            self._conns.add(conn)
            self.connections = len(self._conns)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._enter_head(conn, now)
            if len(self._conns) > self.limits.max_connections:
                victim = self._victim()
                assert victim is not None  # checked above: there is one
                self._displace(victim)
        self._accept_on()

    def _victim(self) -> Conn | None:
        """The head to displace: the oldest one that has had a turn to be read, preferring a
        head that arrives in pieces (a trickler) to one whose first bytes are not in yet (a
        client that sends its request at once is such a head only until its packet lands)."""
        silent = None
        for conn in self._heads:
            if conn.turn >= self._turns:
                break  # accepted this turn: not read yet (heads are in arrival order)
            if conn.got_bytes:
                return conn
            silent = silent or conn
        return silent

    def _displaceable(self) -> bool:
        """Is there a head to displace, one that has had a turn to be read?"""
        return self._victim() is not None

    def _accept_on(self) -> None:
        """Listen while there is room (or a head to displace), else leave it to the backlog."""
        if self._accept_paused_until or self._closing:
            return
        room = len(self._conns) < self.limits.max_connections or self._displaceable()
        if room and not self._accepting:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
            self._accepting = True
        elif not room:
            self._accept_off()

    def _accept_off(self) -> None:
        if self._accepting:
            self._selector.unregister(self._listener)
            self._accepting = False

    def _displace(self, oldest: Conn) -> None:
        if oldest.got_bytes:
            limit = self.limits.max_connections
            reason = "connections full: closed the slowest head"
            self._log("http.busy", status=503, reason=reason, max_connections=limit)
            oldest.send_final(error_answer(503, "too many connections; this head was slowest"))
        self._close(oldest)

    def _enter_head(self, conn: Conn, now: float) -> None:
        conn.phase = Phase.HEAD
        conn.got_bytes = conn.buffered > 0
        self._heads[conn] = None
        self._set_deadline(conn, now + self.limits.header_timeout_s)

    def _set_deadline(self, conn: Conn, at: float) -> None:
        conn.deadline = at
        heapq.heappush(self._deadlines, (at, next(self._seq), conn))

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            at, _, conn = heapq.heappop(self._deadlines)
            if conn.closed or conn.deadline != at:
                continue
            if conn.phase is Phase.HELD:
                conn.final_due = True
                self._guarded(conn, self._check, conn)
            elif conn.phase is Phase.HEAD and conn.got_bytes:
                timeout_s = self.limits.header_timeout_s
                message = f"request head not complete within {timeout_s:g} s"
                conn.close_after = True
                self._guarded(conn, self._answer, conn, error_answer(408, message))
            else:  # idle (no request: no error), or a client that does not read its answer
                self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.unwatch is not None:
            conn.unwatch()
            conn.unwatch = None
            self.held -= 1
        self._heads.pop(conn, None)
        self._conns.discard(conn)
        self.connections = len(self._conns)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    # -- requests -----------------------------------------------------------------------

    def _receive(self, conn: Conn) -> None:
        if conn.receive() and conn.phase is Phase.HEAD:
            self._read_requests(conn)

    def _read_requests(self, conn: Conn) -> None:
        try:
            request = conn.next_request()
        except BadHead as err:
            conn.close_after = True
            self._answer(conn, error_answer(err.status, str(err)))
            return
        if request is None:
            return
        self._heads.pop(conn, None)
        conn.phase, conn.deadline = Phase.BUSY, 0.0
        conn.target = bytes(request.target)
        try:
            action = route(self.backend, bytes(request.method), conn.target)
        except Exception as err:
            self._failed(conn, err)
            action = error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        if isinstance(action, Answer):
            self._answer(conn, action)
        elif isinstance(action, Call):
            self._submit(conn, "answer", action.run)
        elif self.held >= self.limits.max_waiters:
            message = f"too many requests waiting ({self.limits.max_waiters}); ask again later"
            self._answer(conn, error_answer(503, message, ("Retry-After", "1")))
        else:
            self._hold(conn, action)

    def _answer(self, conn: Conn, answer: Answer) -> None:
        if answer.error is not None and answer.status != HTTPStatus.INTERNAL_SERVER_ERROR:
            busy = answer.status == HTTPStatus.SERVICE_UNAVAILABLE
            name = "http.busy" if busy else "http.client_error"
            self._log(name, status=answer.status, reason=answer.error, path=conn.shown_target())
        self._heads.pop(conn, None)
        conn.queue_answer(answer, keep_alive_s=max(1, int(self.limits.header_timeout_s) - 1))
        conn.phase = Phase.WRITE
        self._set_deadline(conn, time.monotonic() + self.limits.header_timeout_s)
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        if not conn.flush():
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        if not conn.next_cycle():
            self._close(conn)
            return
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self._enter_head(conn, time.monotonic())
        if conn.buffered:  # a pipelined request: read on the next turn, not by recursion
            self._runnable.append(conn)

    # -- held requests (?wait) ----------------------------------------------------------

    def _hold(self, conn: Conn, hold: Hold) -> None:
        conn.phase, conn.hold = Phase.HELD, hold
        self.held += 1
        conn.unwatch = hold.watch(lambda: self._post(conn, "wake", None))
        self._set_deadline(conn, time.monotonic() + hold.wait_s)
        self._check(conn)  # after watching: a verdict recorded in between is not missed

    def _check(self, conn: Conn) -> None:
        if conn.checking:
            conn.recheck = True
            return
        assert conn.hold is not None
        conn.checking, conn.recheck = True, False
        self._submit(conn, "checked", conn.hold.check, conn.final_due)

    def _checked(self, conn: Conn, answer: Answer | None) -> None:
        conn.checking = False
        if answer is None:
            if conn.recheck or conn.final_due:
                self._check(conn)
            return
        if conn.unwatch is not None:
            conn.unwatch()
            conn.unwatch = None
            self.held -= 1
        conn.hold = None
        self._answer(conn, answer)

    def _answer_held_now(self) -> None:
        """At close: each held request gets the state it has (on this thread: no pool now)."""
        for conn in list(self._conns):
            if conn.phase is Phase.HELD and conn.hold is not None:
                with contextlib.suppress(Exception):
                    answer = conn.hold.check(True)
                    if answer is not None:
                        conn.send_final(answer)

    # -- the pool and the inbox ---------------------------------------------------------

    def _submit(self, conn: Conn, kind: str, fn: Callable[..., Answer | None], *args: Any) -> None:
        try:
            future = self._pool.submit(fn, *args)
        except RuntimeError as err:  # the pool is shut down: the server is closing
            raise Gone from err
        future.add_done_callback(lambda done: self._post(conn, kind, done))

    def _post(self, conn: Conn, kind: str, payload: Any) -> None:
        """From any thread: hand something to the loop."""
        self._inbox.append((conn, kind, payload))
        self._signal()

    def _signal(self) -> None:
        with self._wake_lock:
            if self._wake_open:  # once closed, its number may be a file a scan opened
                os.eventfd_write(self._wakefd, 1)

    def _take(self, conn: Conn, kind: str, payload: Any) -> None:
        if conn.closed:
            return
        if kind == "wake":
            if conn.phase is Phase.HELD:
                self._check(conn)
            return
        answer = self._result(conn, payload)
        if kind == "checked":
            self._checked(conn, answer)
        else:
            self._answer(conn, answer or error_answer(500, "internal error"))

    def _result(self, conn: Conn, future: Future[Answer | None]) -> Answer | None:
        try:
            return future.result()
        except Exception as err:
            self._failed(conn, err)
            return error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
