"""clamd's socket protocol, for what the PyPI `clamd` package cannot do. Standard library only.

The package (1.0.2, frozen since 2014) is used through its public classes for clamd's
administrative commands (watcher/clamav.py). What it cannot do lives here, used by the daemon
and by `watcher healthcheck` alike:

- a connect timeout (clamd stops accepting while its queue is full; connect() then blocks),
  and kernel timeouts on the open socket (SO_RCVTIMEO/SO_SNDTIMEO: a Python-level timeout
  costs a poll before every send and receive);
- ``z`` (NUL) framing, and never caller data in a command (a path from an upload could split
  an ``n``-framed one): scans pass the open file (FILDES) or its bytes (INSTREAM);
- FILDES (the fd itself, over a unix socket), INSTREAM with `sendall` and 1 MiB chunks whose
  reply is read even after clamd cut the stream short (StreamMaxLength), IDSESSION;
- a reply that is not one clamd-terminated answer is an error, never a verdict.

Failures: `ClamdUnavailable` when clamd cannot be reached (the caller waits for it), `Lost`
when a request was sent and no answer came (it counts against the file being scanned).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watcher.errors import ClamdUnavailable

INSTREAM_CHUNK_BYTES = 1024 * 1024
_MAX_REPLY_BYTES = 1024 * 1024

Address = Path | tuple[str, int]


class Lost(Exception):
    """A request was sent and no whole answer came back."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def parse_address(text: str) -> Address:
    """``/run/clamav/clamd.sock`` or ``host:port`` (``[::1]:3310``)."""
    if text.startswith("/"):
        return Path(text)
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def connect(address: Address, connect_timeout_s: float, timeout_s: float) -> socket.socket:
    """A blocking socket to clamd whose sends and receives give up after `timeout_s`."""
    if isinstance(address, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = str(address)
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = address
    try:
        sock.settimeout(connect_timeout_s)
        sock.connect(target)
        sock.settimeout(None)
        limit = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    except OSError as err:
        sock.close()
        raise ClamdUnavailable(f"cannot connect to clamd at {_shown(address)}: {err}") from err
    return sock


def send_command(sock: socket.socket, name: str) -> None:
    sock.sendall(b"z" + name.encode("ascii") + b"\0")


def read_reply(sock: socket.socket) -> str:
    """One NUL-terminated reply; `Lost` on a timeout or a connection closed before its end."""
    chunks: list[bytes] = []
    received = 0
    while received < _MAX_REPLY_BYTES:
        try:
            data = sock.recv(65536)
        except OSError as err:
            timed_out = err.errno in (errno.EAGAIN, errno.ETIMEDOUT)
            raise Lost(f"reading clamd's reply: {err}", timed_out) from err
        if not data:
            break
        chunks.append(data)
        received += len(data)
        if data.endswith(b"\0"):
            break
    return b"".join(chunks).rstrip(b"\0").decode("utf-8", "replace").strip()


def exchange(
    address: Address,
    send: Callable[[socket.socket], None],
    what: str,
    connect_timeout_s: float,
    timeout_s: float,
) -> str:
    """One request on a connection of its own: connect, `send`, read the reply, close."""
    sock = connect(address, connect_timeout_s, timeout_s)
    try:
        send(sock)
        return read_reply(sock)
    except OSError as err:
        raise Lost(f"{what}: {err}") from err
    finally:
        sock.close()


def request(address: Address, name: str, connect_timeout_s: float, timeout_s: float) -> str:
    """One command (PING, VERSION, ...)."""
    return exchange(
        address, lambda sock: send_command(sock, name), name, connect_timeout_s, timeout_s
    )


def ping(address: Address, timeout_s: float) -> str | None:
    """None if clamd answered PONG within `timeout_s`, else why not."""
    try:
        reply = request(address, "PING", timeout_s, timeout_s)
    except (ClamdUnavailable, Lost) as err:
        return str(err)
    return None if reply == "PONG" else f"PING answered {reply!r}"


def fildes(sock: socket.socket, fd: int) -> None:
    """Hand clamd an open file (unix socket only): it reads the file itself."""
    send_command(sock, "FILDES")
    socket.send_fds(sock, [b"\0"], [fd])


def instream(sock: socket.socket, chunks: Iterable[bytes]) -> None:
    """Stream bytes; stop quietly if clamd cuts us off (StreamMaxLength): its reply says why."""
    send_command(sock, "INSTREAM")
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), INSTREAM_CHUNK_BYTES):
                piece = view[start : start + INSTREAM_CHUNK_BYTES]
                sock.sendall(struct.pack("!L", len(piece)))
                sock.sendall(piece)
        sock.sendall(struct.pack("!L", 0))
    except (BrokenPipeError, ConnectionResetError):
        pass


def file_chunks(fd: int) -> Iterable[bytes]:
    offset = 0
    while chunk := os.pread(fd, INSTREAM_CHUNK_BYTES, offset):
        yield chunk
        offset += len(chunk)


def scan_once(address: Address, fd: int, connect_timeout_s: float, timeout_s: float) -> str:
    """One scan: FILDES over a unix socket, INSTREAM over TCP."""

    def send(sock: socket.socket) -> None:
        if isinstance(address, Path):
            fildes(sock, fd)
        else:
            instream(sock, file_chunks(fd))

    return exchange(address, send, "scan", connect_timeout_s, timeout_s)


def stream_once(
    address: Address, chunks: Iterable[bytes], connect_timeout_s: float, timeout_s: float
) -> str:
    """INSTREAM of bytes made in memory (unix socket or TCP)."""
    return exchange(
        address, lambda sock: instream(sock, chunks), "INSTREAM", connect_timeout_s, timeout_s
    )


class Session:
    """One IDSESSION connection (unix socket), one FILDES request at a time.

    A connection per file cost the daemon about ten system calls and clamd an accept and a
    thread hand-off; in a session a scan is a send and a receive. Replies come back numbered
    (``3: fd[9]: OK``): the number must be the one we expect, or the session is dropped.
    """

    def __init__(self, path: Path, connect_timeout_s: float, timeout_s: float) -> None:
        self.sock = connect(path, connect_timeout_s, timeout_s)
        self.requests = 0
        self.opened_at = time.monotonic()
        try:
            send_command(self.sock, "IDSESSION")
        except OSError as err:
            self.sock.close()
            raise ClamdUnavailable(f"IDSESSION: {err}") from err

    def send_fildes(self, fd: int) -> None:
        fildes(self.sock, fd)
        self.requests += 1

    def receive(self) -> str:
        reply = read_reply(self.sock)
        number, sep, rest = reply.partition(": ")
        if not sep or number != str(self.requests):
            raise Lost(f"unexpected reply in session: {reply!r}")
        return rest

    def close(self) -> None:
        self.sock.close()


def _shown(address: Address) -> str:
    return str(address) if isinstance(address, Path) else f"{address[0]}:{address[1]}"
