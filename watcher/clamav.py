"""The clamd adapter: the PyPI `clamd` package with its known defects fixed, behind `Scanner`.

Fixed here (see PITFALLS.md): one client per call (instances are not thread-safe); a connect
timeout; `z` (NUL) framing and no caller data in commands; `sendall` and 1 MiB INSTREAM chunks;
reading clamd's reply after a broken pipe; FILDES on unix sockets, for worker threads
(`keep_session`) in IDSESSION connections from a bounded pool that closes idle and aged ones
(watcher/sessions.py says why). Errors that come back as data become `NotScanned`;
connection failures become `ClamdUnavailable`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import clamd

from watcher.errors import ClamdUnavailable
from watcher.sessions import SessionPool
from watcher.settings import Settings
from watcher.verdict import NotScanned, Verdict, parse_reply

INSTREAM_CHUNK_BYTES = 1024 * 1024
_MAX_REPLY_BYTES = 1024 * 1024


class Scanner(Protocol):
    """What the pipeline needs from a virus scanner."""

    def scan_fd(self, fd: int) -> Verdict: ...
    def ping(self) -> None: ...
    def version(self) -> str: ...


class _ConnectFailed(clamd.ConnectionError):  # type: ignore[misc]
    """clamd did not accept the connection (down, or its backlog is full)."""


class _FixedProtocol:
    """Overrides of `clamd.ClamdNetworkSocket` internals; mixed into both socket kinds."""

    clamd_socket: socket.socket
    timeout: float
    connect_timeout: float

    def _connect(self, family: int, address: Any) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)  # clamd's backlog can block connect()
            sock.connect(address)
            sock.settimeout(self.timeout)
        except OSError as err:
            sock.close()
            raise _ConnectFailed(f"cannot connect to clamd at {address}: {err}") from err
        self.clamd_socket = sock

    def _send_command(self, cmd: str, *args: str) -> None:
        if args:  # never put a path (an uploader's name) into a command
            raise ValueError("clamd commands take no arguments here")
        self.clamd_socket.sendall(b"z" + cmd.encode("ascii") + b"\0")

    def _recv_response(self) -> str:
        chunks: list[bytes] = []
        received = 0
        while received < _MAX_REPLY_BYTES:
            try:
                data = self.clamd_socket.recv(65536)
            except BlockingIOError as err:  # SO_RCVTIMEO ran out (a session's socket)
                timeout = TimeoutError(errno.ETIMEDOUT, "timed out")
                raise clamd.ConnectionError(f"reading clamd reply: {err}") from timeout
            except OSError as err:
                raise clamd.ConnectionError(f"reading clamd reply: {err}") from err
            if not data:
                break
            chunks.append(data)
            received += len(data)
            if data.endswith(b"\0"):
                break
        return b"".join(chunks).rstrip(b"\0").decode("utf-8", "replace").strip()

    _recv_response_multiline = _recv_response

    def fildes(self, fd: int) -> str:
        """Scan an open file descriptor (unix socket only): clamd reads the file itself."""
        self._init_socket()  # type: ignore[attr-defined]
        try:
            self._send_command("FILDES")
            socket.send_fds(self.clamd_socket, [b"\0"], [fd])
            return self._recv_response()
        except OSError as err:
            raise clamd.ConnectionError(f"FILDES: {err}") from err
        finally:
            self.clamd_socket.close()

    def instream_fd(self, fd: int) -> str:
        """Stream an open file in large chunks; read the reply even if clamd cut us off."""
        self._init_socket()  # type: ignore[attr-defined]
        try:
            self._send_command("INSTREAM")
            offset = 0
            try:
                while chunk := os.pread(fd, INSTREAM_CHUNK_BYTES, offset):
                    self.clamd_socket.sendall(struct.pack("!L", len(chunk)) + chunk)
                    offset += len(chunk)
                self.clamd_socket.sendall(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # StreamMaxLength: clamd replies, then closes
            return self._recv_response()
        except OSError as err:
            raise clamd.ConnectionError(f"INSTREAM: {err}") from err
        finally:
            self.clamd_socket.close()

    def instream_chunks(self, chunks: Iterable[bytes]) -> str:
        """INSTREAM of bytes made in memory (an archive member), whatever their chunking."""
        self._init_socket()  # type: ignore[attr-defined]
        try:
            self._send_command("INSTREAM")
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    for start in range(0, len(view), INSTREAM_CHUNK_BYTES):
                        piece = view[start : start + INSTREAM_CHUNK_BYTES]
                        self.clamd_socket.sendall(struct.pack("!L", len(piece)))
                        self.clamd_socket.sendall(piece)
                self.clamd_socket.sendall(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # StreamMaxLength: clamd replies, then closes
            return self._recv_response()
        except OSError as err:
            raise clamd.ConnectionError(f"INSTREAM: {err}") from err
        finally:
            self.clamd_socket.close()


class _UnixClient(_FixedProtocol, clamd.ClamdUnixSocket):  # type: ignore[misc]
    def __init__(self, path: str, timeout: float, connect_timeout: float) -> None:
        super().__init__(path=path, timeout=timeout)
        self.connect_timeout = connect_timeout

    def _init_socket(self) -> None:
        self._connect(socket.AF_UNIX, self.unix_socket)

    def scan_reply(self, fd: int) -> str:
        return self.fildes(fd)


class _TcpClient(_FixedProtocol, clamd.ClamdNetworkSocket):  # type: ignore[misc]
    def __init__(self, host: str, port: int, timeout: float, connect_timeout: float) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
        self.connect_timeout = connect_timeout

    def _init_socket(self) -> None:
        self._connect(socket.AF_INET, (self.host, self.port))

    def scan_reply(self, fd: int) -> str:
        return self.instream_fd(fd)


# A pooled session idle this long is closed: an idle one holds a place in clamd's MaxQueue.
SESSION_IDLE_S = 0.25
# A session is closed after its reply once this old (jittered down to half): while every
# session is busy, this is how long another client may wait to be accepted by a full clamd.
SESSION_MAX_AGE_S = 0.5


class _Session:
    """One IDSESSION connection on the unix socket, one request at a time.

    A connection per file cost the daemon about ten system calls and clamd an accept and a
    thread hand-off; in a session a scan is a send and a receive. Replies come back numbered
    (``3: fd[9]: OK``): the number must be the one we expect, or the session is dropped.
    """

    def __init__(self, path: str, timeout: float, connect_timeout: float) -> None:
        self._client = _UnixClient(path, timeout, connect_timeout)
        self._client._init_socket()
        self.sock = self._client.clamd_socket
        # Blocking, with the timeout in the kernel: on a socket with a Python timeout, CPython
        # polls before every send and receive (three more system calls per file).
        self.sock.settimeout(None)
        limit = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.requests = 0
        try:
            self.sock.sendall(b"zIDSESSION\0")
        except OSError as err:
            self.sock.close()
            raise _ConnectFailed(f"IDSESSION: {err}") from err

    def send_fildes(self, fd: int) -> None:
        self.sock.sendall(b"zFILDES\0")
        socket.send_fds(self.sock, [b"\0"], [fd])
        self.requests += 1

    def receive(self) -> str:
        reply = self._client._recv_response()
        number, sep, rest = reply.partition(": ")
        if not sep or number != str(self.requests):
            raise clamd.ConnectionError(f"unexpected reply in session: {reply!r}")
        return rest

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class ClamdScanner:
    """A `Scanner` on a real clamd: FILDES over a unix socket, INSTREAM over TCP."""

    socket_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 3310
    scan_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    _local: threading.local = field(
        default_factory=threading.local, init=False, compare=False, repr=False
    )
    _sessions: SessionPool[_Session] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        pool = SessionPool(
            self._open_session, self._session_limit, SESSION_IDLE_S, SESSION_MAX_AGE_S
        )
        object.__setattr__(self, "_sessions", pool)  # frozen: set once, here

    def _client(self, timeout: float) -> _UnixClient | _TcpClient:
        if self.socket_path is not None:
            return _UnixClient(str(self.socket_path), timeout, self.connect_timeout_s)
        return _TcpClient(self.host, self.port, timeout, self.connect_timeout_s)

    @property
    def address(self) -> str:
        return str(self.socket_path) if self.socket_path else f"{self.host}:{self.port}"

    def scan_fd(self, fd: int) -> Verdict:
        try:
            if self.socket_path is not None and getattr(self._local, "keep", False):
                reply = self._scan_in_session(fd)
            else:
                reply = self._client(self.scan_timeout_s).scan_reply(fd)
        except _ConnectFailed as err:
            raise ClamdUnavailable(str(err)) from err
        except clamd.ConnectionError as err:
            # Counted as an attempt, not an outage: a file that kills clamd mid-scan must end
            # as unscannable, not be retried forever. If clamd is really down, the next
            # connect fails and the outage is handled there.
            if isinstance(err.__cause__, TimeoutError):
                return NotScanned(f"clamd did not answer within {self.scan_timeout_s}s", True)
            return NotScanned(f"clamd dropped the connection mid-scan: {err}", True)
        if not reply:
            return NotScanned("empty reply from clamd", transient=True)
        return parse_reply(reply)

    def scan_stream(self, chunks: Iterable[bytes]) -> Verdict:
        """Scan bytes that exist only in memory (archive members watcher extracted itself):
        INSTREAM on a connection of its own, over the unix socket or TCP alike.
        Errors as in `scan_fd`: `ClamdUnavailable` when clamd cannot be reached."""
        try:
            reply = self._client(self.scan_timeout_s).instream_chunks(chunks)
        except _ConnectFailed as err:
            raise ClamdUnavailable(str(err)) from err
        except clamd.ConnectionError as err:
            if isinstance(err.__cause__, TimeoutError):
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
                return self._client(self.scan_timeout_s).scan_reply(fd)
            try:
                session.send_fildes(fd)
            except OSError as err:
                pool.discard(session)
                raise clamd.ConnectionError(f"FILDES: {err}") from err
        try:
            reply = session.receive()
        except BaseException:
            pool.discard(session)
            raise
        pool.give_back(session)
        return reply

    def _open_session(self) -> _Session:
        assert self.socket_path is not None
        return _Session(str(self.socket_path), self.scan_timeout_s, self.connect_timeout_s)

    def _session_limit(self) -> int | None:
        """clamd's MaxThreads (STATS), or None while clamd does not answer."""
        try:
            return self.max_threads()
        except ClamdUnavailable:
            return None

    def _command(self, command: str, timeout: float) -> str:
        client = self._client(timeout)
        try:
            reply: str = client._basic_command(command)
        except clamd.ClamdError as err:
            raise ClamdUnavailable(f"{command}: {err}") from err
        except OSError as err:
            raise ClamdUnavailable(f"{command}: {err}") from err
        return reply

    def ping(self, timeout: float | None = None) -> None:
        reply = self._command("PING", timeout or self.connect_timeout_s)
        if reply != "PONG":
            raise ClamdUnavailable(f"PING answered {reply!r}")

    def version(self) -> str:
        """E.g. ``ClamAV 1.4.6/27100/Thu Nov 26 09:27:32 2026`` (no date with custom-only DBs)."""
        return self._command("VERSION", self.connect_timeout_s)

    def reload(self) -> str:
        return self._command("RELOAD", self.connect_timeout_s)

    def max_threads(self) -> int | None:
        """clamd's MaxThreads, from STATS (``THREADS: live 1  idle 0 max 10 ...``)."""
        client = self._client(self.connect_timeout_s)
        try:
            stats: str = client.stats()
        except (clamd.ClamdError, OSError) as err:
            raise ClamdUnavailable(f"STATS: {err}") from err
        match = re.search(r"\bmax (\d+)", stats)
        return int(match.group(1)) if match else None


def scanner_from_settings(settings: Settings) -> ClamdScanner:
    return ClamdScanner(
        socket_path=settings.clamav_socket,
        host=settings.clamav_host,
        port=settings.clamav_port,
        scan_timeout_s=settings.scan_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
    )
