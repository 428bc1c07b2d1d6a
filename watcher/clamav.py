"""The clamd adapter behind `Scanner`: scans through watcher/clamd_socket.py, clamd's
administrative commands (VERSION, RELOAD, STATS) through the PyPI `clamd` package's public
classes.

Worker threads (`keep_session`) scan with FILDES in IDSESSION connections from a bounded pool
that closes idle and aged ones (watcher/sessions.py says why); other threads get a connection
per scan. Over TCP a scan is INSTREAM on a connection of its own, to one of the endpoints
CLAMAV_HOST names or resolves to (watcher/endpoints.py: spread, health, re-resolution); a
single local clamd on its unix socket never goes through that pool. Errors that come back as
data become `NotScanned`; clamd out of reach is `ClamdUnavailable`. The package's classes are
neither thread-safe nor given a connect timeout: each call gets an instance of its own, on a
thread of its own that the caller waits for at most `connect_timeout_s` more than the
command's own timeout.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import clamd

from watcher import clamd_socket
from watcher.clamd_socket import Address, Lost, Session
from watcher.endpoints import EndpointPool, EndpointStatus, HostPort, parse_hosts
from watcher.errors import ClamdUnavailable
from watcher.sessions import SessionPool
from watcher.settings import Settings
from watcher.verdict import NotScanned, Verdict, parse_reply

T = TypeVar("T")


class Scanner(Protocol):
    """What the pipeline needs from a virus scanner."""

    def scan_fd(self, fd: int) -> Verdict: ...
    def ping(self) -> None: ...
    def version(self) -> str: ...


# A pooled session idle this long is closed: an idle one holds a place in clamd's MaxQueue.
SESSION_IDLE_S = 0.25
# A session is closed after its reply once this old (jittered down to half): while every
# session is busy, this is how long another client may wait to be accepted by a full clamd.
SESSION_MAX_AGE_S = 0.5


@dataclass(frozen=True)
class ClamdScanner:
    """A `Scanner` on a real clamd: FILDES over a unix socket, INSTREAM over TCP.

    Over TCP, `host` is CLAMAV_HOST: one host, a comma-separated list of ``host[:port]``, or a
    name with several addresses; every address is an endpoint of a pool. ``single=True`` talks
    to exactly ``(host, port)``, without a pool (the canaries vet one endpoint that way).
    """

    socket_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 3310
    scan_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    resolve_interval_s: float = 10.0
    single: bool = False
    _local: threading.local = field(
        default_factory=threading.local, init=False, compare=False, repr=False
    )
    _sessions: SessionPool[Session] = field(init=False, compare=False, repr=False)
    pool: EndpointPool | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        pool = SessionPool(
            self._open_session, self._session_limit, SESSION_IDLE_S, SESSION_MAX_AGE_S
        )
        object.__setattr__(self, "_sessions", pool)  # frozen: set once, here
        if self.socket_path is None and not self.single:
            endpoints = EndpointPool(
                parse_hosts(self.host, self.port),
                self.connect_timeout_s,
                self.resolve_interval_s,
                ping=lambda address, timeout_s: clamd_socket.ping(address, timeout_s),
                capacity_of=lambda address: self.at(address).max_threads(),
            )
            object.__setattr__(self, "pool", endpoints)

    def at(self, address: HostPort) -> ClamdScanner:
        """This clamd's endpoint `address` alone (no pool)."""
        return ClamdScanner(
            host=address[0],
            port=address[1],
            scan_timeout_s=self.scan_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            single=True,
        )

    def endpoints(self) -> list[EndpointStatus]:
        """Each endpoint of the pool and how it is doing; none without a pool."""
        return self.pool.status() if self.pool is not None else []

    @property
    def target(self) -> Address:
        return self.socket_path if self.socket_path is not None else (self.host, self.port)

    @property
    def address(self) -> str:
        return str(self.socket_path) if self.socket_path else f"{self.host}:{self.port}"

    def scan_fd(self, fd: int) -> Verdict:
        if self.socket_path is not None and getattr(self._local, "keep", False):
            return self._verdict(lambda: self._scan_in_session(fd))
        return self._verdict(
            lambda: self._once(
                lambda address: clamd_socket.scan_once(
                    address, fd, self.connect_timeout_s, self.scan_timeout_s
                )
            )
        )

    def scan_stream(self, chunks: Iterable[bytes]) -> Verdict:
        """Scan bytes that exist only in memory (archive members watcher extracted itself):
        INSTREAM on a connection of its own, over the unix socket or TCP alike."""
        return self._verdict(
            lambda: self._once(
                lambda address: clamd_socket.stream_once(
                    address, chunks, self.connect_timeout_s, self.scan_timeout_s
                )
            )
        )

    def _once(self, exchange: Callable[[Address], str]) -> str:
        """One exchange with our clamd, or with one endpoint of the pool (connect comes before
        the first byte: a refused endpoint consumes none of the request)."""
        if self.pool is not None:
            return self.pool.run(exchange)
        return exchange(self.target)

    def _verdict(self, exchange: Callable[[], str]) -> Verdict:
        """The verdict of one exchange; `ClamdUnavailable` (from connect) passes through."""
        try:
            reply = exchange()
        except Lost as err:
            # Counted as an attempt, not an outage: a file that kills clamd mid-scan must end
            # as unscannable, not be retried forever. If clamd is really down, the next
            # connect fails and the outage is handled there.
            if err.timed_out:
                return NotScanned(f"clamd did not answer within {self.scan_timeout_s}s", True)
            return NotScanned(f"clamd dropped the connection mid-scan: {err}", True)
        if not reply:
            return NotScanned("empty reply from clamd", transient=True)
        return parse_reply(reply)

    def keep_session(self) -> None:
        """The calling thread scans file after file (a worker): its scans go through the pool
        of IDSESSION connections until `end_session`. Other threads get a connection per scan."""
        self._local.keep = True

    def end_session(self) -> None:
        """The calling thread (a worker that stops) scans no more; pooled sessions are closed."""
        self._local.keep = False
        self._sessions.close()

    def _scan_in_session(self, fd: int) -> str:
        """FILDES in a pooled session; a fresh one if the pooled one is gone before the send.

        Only a failed send is retried (clamd closed the session): once the request is sent, a
        lost connection is the scan's failure, as with a connection per file. With as many
        sessions open as clamd has threads, the scan gets a connection of its own.
        """
        pool = self._sessions
        session = pool.lease()
        if session is not None:
            try:
                session.send_fildes(fd)
            except OSError:
                pool.discard(session)
                session = None
        if session is None:
            session = pool.open()
            if session is None:
                return clamd_socket.scan_once(
                    self.target, fd, self.connect_timeout_s, self.scan_timeout_s
                )
            try:
                session.send_fildes(fd)
            except OSError as err:
                pool.discard(session)
                raise Lost(f"FILDES: {err}") from err
        try:
            reply = session.receive()
        except BaseException:
            pool.discard(session)
            raise
        pool.give_back(session)
        return reply

    def _open_session(self) -> Session:
        assert self.socket_path is not None
        return Session(self.socket_path, self.connect_timeout_s, self.scan_timeout_s)

    def _session_limit(self) -> int | None:
        """clamd's MaxThreads (STATS), or None while clamd does not answer."""
        try:
            return self.max_threads()
        except ClamdUnavailable:
            return None

    def ping(self, timeout: float | None = None) -> None:
        """PONG within `timeout`; with a pool, from any usable endpoint."""
        if self.pool is not None:
            self.pool.ping_any(timeout or self.connect_timeout_s)
            return
        problem = clamd_socket.ping(self.target, timeout or self.connect_timeout_s)
        if problem is not None:
            raise ClamdUnavailable(problem)

    def version(self) -> str:
        """E.g. ``ClamAV 1.4.6/27100/Thu Nov 26 09:27:32 2026`` (no date with custom-only DBs).

        With a pool, the oldest definitions any usable endpoint has loaded: staleness must not
        hide behind one fresh endpoint, and a rescan after new definitions waits for all.
        """
        if self.pool is not None:
            versions = self._each(lambda one: one.version())
            return min(versions, key=_daily_version)
        return str(self._admin("VERSION", lambda c: c.version()))

    def reload(self) -> str:
        """RELOAD; with a pool, every usable endpoint (e.g. sharing one definitions volume)."""
        if self.pool is not None:
            return self._each(lambda one: one.reload())[0]
        return str(self._admin("RELOAD", lambda c: c.reload()))

    def max_threads(self) -> int | None:
        """clamd's MaxThreads, from STATS (``THREADS: live 1  idle 0 max 10 ...``); with a
        pool, the sum over its usable endpoints."""
        if self.pool is not None:
            self.pool.ping_any(self.connect_timeout_s)  # resolved, and at least one usable
            return sum(e.capacity for e in self.pool.status() if e.state == "ready") or None
        stats = str(self._admin("STATS", lambda c: c.stats()))
        match = re.search(r"\bmax (\d+)", stats)
        return int(match.group(1)) if match else None

    def _each(self, call: Callable[[ClamdScanner], T]) -> list[T]:
        """`call` on every usable endpoint that answers; ClamdUnavailable if none does."""
        assert self.pool is not None
        self.pool.ping_any(self.connect_timeout_s)
        answers: list[T] = []
        for address in self.pool.ready_addresses():
            try:
                answers.append(call(self.at(address)))
            except ClamdUnavailable as err:
                self.pool.take_out(address, str(err))
        if not answers:
            raise ClamdUnavailable("no clamd endpoint answered")
        return answers

    def _admin(self, command: str, call: Callable[[clamd.ClamdNetworkSocket], T]) -> T:
        """One administrative command through the package, bounded in time."""
        client: clamd.ClamdNetworkSocket = (
            clamd.ClamdUnixSocket(path=str(self.socket_path), timeout=self.connect_timeout_s)
            if self.socket_path is not None
            else clamd.ClamdNetworkSocket(
                host=self.host, port=self.port, timeout=self.connect_timeout_s
            )
        )
        outcome: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                outcome.append(call(client))
            except BaseException as err:  # handed to the caller's thread
                failure.append(err)

        thread = threading.Thread(target=run, name=f"clamd-{command}", daemon=True)
        thread.start()
        thread.join(2 * self.connect_timeout_s)  # its connect has no timeout of its own
        if failure:
            raise ClamdUnavailable(f"{command}: {failure[0]}") from failure[0]
        if not outcome:
            raise ClamdUnavailable(f"{command}: no answer within {2 * self.connect_timeout_s}s")
        return outcome[0]


def _daily_version(version: str) -> int:
    """``ClamAV 1.4.6/27100/...`` → 27100; custom-only sets (``ClamAV 1.4.6``) → 0."""
    parts = version.split("/")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def scanner_from_settings(settings: Settings) -> ClamdScanner:
    return ClamdScanner(
        socket_path=settings.clamav_socket,
        host=settings.clamav_host,
        port=settings.clamav_port,
        scan_timeout_s=settings.scan_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        resolve_interval_s=settings.clamd_resolve_interval_s,
    )
