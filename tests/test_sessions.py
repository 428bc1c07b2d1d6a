"""The clamd session pool: bounded, gives clamd's capacity back when idle or aged, and a
session that breaks never costs a file more than the scan attempt it was sending."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.events import wait_until
from watcher.clamav import ClamdScanner
from watcher.errors import ClamdUnavailable
from watcher.sessions import SessionPool
from watcher.verdict import Clean, Infected, NotScanned

MakeClamd = Callable[..., Clamd]


class FakeSession:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def pool(limit: int = 2, idle_s: float = 60.0, max_age_s: float = 60.0) -> SessionPool[FakeSession]:
    return SessionPool(FakeSession, lambda: limit, idle_s, max_age_s)


def test_no_more_sessions_open_than_the_limit() -> None:
    """Past the limit `open` says no (the caller scans on a connection of its own); a
    discarded session frees its place."""
    sessions = pool(limit=2)
    first, second = sessions.open(), sessions.open()
    assert first is not None and second is not None
    assert sessions.open() is None
    sessions.discard(first)
    assert first.closed and sessions.open_count == 1
    assert sessions.open() is not None


def test_the_most_recently_used_session_is_leased_first() -> None:
    """Under light load one session does the work and the others go idle (and get closed)."""
    sessions = pool(limit=3)
    older, newer = sessions.open(), sessions.open()
    assert older is not None and newer is not None
    sessions.give_back(older)
    sessions.give_back(newer)
    assert sessions.lease() is newer
    assert sessions.lease() is older
    assert sessions.lease() is None


def test_an_idle_session_is_closed_without_anyone_asking() -> None:
    """An idle daemon holds no connection: the reaper closes it, then ends itself."""
    sessions = pool(idle_s=0.05)
    session = sessions.open()
    assert session is not None
    sessions.give_back(session)
    wait_until(lambda: session.closed, 5, "the idle session to be closed")
    assert sessions.open_count == 0 and sessions.lease() is None
    wait_until(lambda: sessions._reaper is None, 5, "the reaper to end")


def test_a_session_past_its_age_is_closed_when_given_back() -> None:
    sessions = pool(max_age_s=0.0)
    session = sessions.open()
    assert session is not None
    sessions.give_back(session)
    assert session.closed and sessions.open_count == 0 and sessions.lease() is None


def test_a_session_that_fails_to_open_frees_its_place() -> None:
    def refuse() -> FakeSession:
        raise ClamdUnavailable("no")

    sessions: SessionPool[FakeSession] = SessionPool(refuse, lambda: 1, 60.0, 60.0)
    with pytest.raises(ClamdUnavailable):
        sessions.open()
    assert sessions.open_count == 0


def test_the_limit_is_asked_until_it_is_known() -> None:
    answers: list[int | None] = [None, 3, 99]
    sessions: SessionPool[FakeSession] = SessionPool(FakeSession, answers.pop, 60.0, 60.0)
    answers.reverse()  # None first: clamd not answering yet
    assert sessions.limit() == sessions.fallback_limit
    assert sessions.limit() == 3
    assert sessions.limit() == 3  # kept: clamd is not asked again


# -- on a real clamd ------------------------------------------------------------------------


@pytest.fixture
def sample(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "sample.txt"
    path.write_bytes(b"nothing to see")
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def hold_sessions(server: Clamd, count: int) -> list[socket.socket]:
    """Another client's idle IDSESSION connections (all accepted once a PING gets through)."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.socket))
        sock.sendall(b"zIDSESSION\0")
        held.append(sock)
    return held


def ping_s(server: Clamd, timeout_s: float) -> float:
    """How long another client's PING took; fails if clamd does not answer in time."""
    started = time.monotonic()
    ClamdScanner(socket_path=server.socket, connect_timeout_s=timeout_s).ping(timeout=timeout_s)
    return time.monotonic() - started


def test_a_session_lost_between_scans_is_replaced_without_failing_a_scan(
    make_clamd: MakeClamd, sample: int
) -> None:
    """A worker's scans share pooled sessions; one clamd closed meanwhile (here by
    restarting) is replaced before the send, and the scan goes ahead."""
    server = make_clamd()
    scanner = server.scanner
    scanner._sessions.idle_s = 60  # kept across clamd's restart
    try:
        assert scanner.scan_fd(sample) == Clean()
        assert scanner._sessions.open_count == 0  # not a worker: no session
        scanner.keep_session()
        assert scanner.scan_fd(sample) == Clean()
        (kept,) = [session for session, _ in scanner._sessions._idle]
        server.stop()
        server.start()
        assert scanner.scan_fd(sample) == Clean()  # a fresh session, not a failed scan
        assert kept.sock.fileno() == -1 and scanner._sessions.open_count == 1
        os.pwrite(sample, EICAR, 0)
        assert isinstance(scanner.scan_fd(sample), Infected)
    finally:
        scanner.end_session()
        server.stop()


def test_a_session_broken_mid_scan_costs_that_scan_and_is_replaced(
    make_clamd: MakeClamd, sample: int
) -> None:
    """Once the request is sent, a lost session is a failed scan attempt (never clean, never
    retried blindly); the broken session is dropped and the next scan gets a new one."""
    server = make_clamd()
    scanner = server.scanner
    scanner._sessions.idle_s = 60
    verdicts = []

    def scan() -> None:
        scanner.keep_session()
        verdicts.append(scanner.scan_fd(sample))

    try:
        scanner.keep_session()
        assert scanner.scan_fd(sample) == Clean()
        (pooled,) = [session for session, _ in scanner._sessions._idle]
        server.freeze()
        worker = threading.Thread(target=scan)
        worker.start()
        wait_until(lambda: pooled.requests == 2, 5, "the request to be sent in that session")
        assert server.proc is not None
        server.proc.kill()
        worker.join(10)
        (verdict,) = verdicts
        assert isinstance(verdict, NotScanned) and verdict.transient
        assert "mid-scan" in verdict.reason
        assert scanner._sessions.open_count == 0
        server.stop()
        server.start()
        assert scanner.scan_fd(sample) == Clean()
        assert scanner._sessions.open_count == 1
    finally:
        scanner.end_session()
        server.stop()


def test_idle_sessions_give_clamd_its_capacity_back(make_clamd: MakeClamd, sample: int) -> None:
    """clamd accepts no more connections once MaxQueue are open, idle sessions included: ours
    close soon after their last scan, so another client gets in."""
    server = make_clamd(max_threads=4, max_queue=16)
    scanner = server.scanner
    held = hold_sessions(server, 15)
    try:
        ping_s(server, 5)  # the 16th connection: the 15 are all accepted
        scanner.keep_session()
        assert scanner.scan_fd(sample) == Clean()  # its session fills clamd's last place
        assert ping_s(server, 5) < 2
        assert scanner._sessions.open_count == 0
    finally:
        scanner.end_session()
        for sock in held:
            sock.close()
        server.stop()


def test_another_client_gets_in_while_every_session_is_busy(
    make_clamd: MakeClamd, tmp_path: Path
) -> None:
    """Two scanners (replicas) whose sessions fill clamd's MaxQueue and never go idle: a
    session past its age closes after its reply, and another client's PING gets in."""
    server = make_clamd(max_threads=8, max_queue=16)
    replicas = [server.scanner, server.scanner]  # 8 sessions each, clamd's MaxThreads
    stop = threading.Event()
    scanned = [0]
    errors: list[BaseException] = []
    path = tmp_path / "busy.txt"
    path.write_bytes(b"x" * 50_000)

    def work(scanner: ClamdScanner) -> None:
        scanner.keep_session()
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                assert scanner.scan_fd(fd) == Clean()
                scanned[0] += 1
        except BaseException as err:
            errors.append(err)
        finally:
            os.close(fd)
            scanner.end_session()

    threads = [threading.Thread(target=work, args=(s,)) for s in replicas for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(s._sessions.open_count for s in replicas) == 16, 10, "16 open")
        before = scanned[0]
        latencies = [ping_s(server, 5) for _ in range(5)]
        assert max(latencies) < 2
        assert scanned[0] > before  # the replicas kept scanning meanwhile
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.stop()
    assert errors == []
