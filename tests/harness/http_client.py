"""Real HTTP requests to a daemon's API, with the raw path sent as given (no normalising), and
attackers on raw sockets, so a test controls every byte and every timing."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watcher.service import Service


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


def address(daemon: Service) -> tuple[str, int]:
    assert daemon.ops.server is not None, "the daemon has no HTTP server"
    return daemon.ops.server.address


def get(target: Service | tuple[str, int], path: str, timeout_s: float = 10.0) -> Response:
    host, port = target if isinstance(target, tuple) else address(target)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), resp.getheader("Content-Type") or "")
    finally:
        conn.close()


# -- attackers: raw sockets, so a test controls every byte and every timing ---------------------


def connect(addr: tuple[str, int], timeout_s: float = 10.0) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout_s)


def read_response(sock: socket.socket) -> Response:
    """One HTTP response from a raw socket (http.client parses it)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return Response(resp.status, resp.read(), resp.getheader("Content-Type") or "")


def raw_request(addr: tuple[str, int], data: bytes, timeout_s: float = 10.0) -> Response:
    """Send `data` as it is (any bytes, any request line) and read the answer."""
    with connect(addr, timeout_s) as sock:
        sock.sendall(data)
        return read_response(sock)


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the way a client that crashed or timed out leaves."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """For a non-blocking socket: has the server closed its end (EOF or RST)? Reads any
    answer sent before that."""
    try:
        while chunk := sock.recv(65536):
            del chunk
    except (BlockingIOError, TimeoutError):
        return False
    except ConnectionError:
        return True
    return True


class Slowloris:
    """`count` connections, each sending a request head one byte every `interval_s` and never
    finishing it. A connection the server closes is opened again, as a real attacker does."""

    HEAD = b"GET /v1/files/slow?wait=30 HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 4096

    def __init__(self, addr: tuple[str, int], count: int, interval_s: float = 0.5) -> None:
        self.addr = addr
        self.count = count
        self.interval_s = interval_s
        self.opened = 0  # connections made (the first `count`, then re-openings)
        self.refused = 0  # connect() failed or timed out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _open(self) -> tuple[socket.socket, int] | None:
        try:
            sock = socket.create_connection(self.addr, timeout=0.5)
        except OSError:
            self.refused += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock, 0

    def _run(self) -> None:
        conns: list[tuple[socket.socket, int] | None] = []
        while not self._stop.is_set():
            while len(conns) < self.count and not self._stop.is_set():
                conns.append(conn := self._open())
                if conn is None:
                    break  # the backlog is full: try again next round
            for n, conn in enumerate(conns):
                if conn is None or (sent := self._trickle(*conn)) is None:
                    if conn is not None:
                        conn[0].close()
                    conns[n] = self._open()
                else:
                    conns[n] = (conn[0], sent)
            self._stop.wait(self.interval_s)
        for conn in conns:
            if conn is not None:
                conn[0].close()

    def _trickle(self, sock: socket.socket, sent: int) -> int | None:
        """One more byte of the head; None when the server has closed the connection."""
        try:
            if closed_by_peer(sock):
                return None
            sock.send(self.HEAD[sent % len(self.HEAD) : sent % len(self.HEAD) + 1])
        except OSError:
            return None
        return sent + 1
