"""One HTTP/1.1 connection of the API server: h11's parser and its bytes in and out.

No I/O wait here: the socket is non-blocking and watcher/httpserver.py decides when to read,
write, answer or close. A request head is at most `MAX_HEAD_BYTES` (over: 431); a request body
is never read (we serve GET only: a request that has one is answered, then the connection is
closed); an answer is always framed by Content-Length.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from enum import Enum
from http import HTTPStatus

import h11

from watcher.ops.api import Answer, Hold

MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's own default)
RECV_BYTES = 65536


class Phase(Enum):
    HEAD = "head"  # reading a request head, or idle between two requests
    BUSY = "busy"  # its answer is being computed (on the pool)
    HELD = "held"  # a ?wait request, waiting for its verdict or its deadline
    WRITE = "write"  # writing an answer


class Gone(Exception):
    """The client closed or reset the connection: nobody to answer."""


class BadHead(Exception):
    """The client sent something that is not an HTTP/1.1 request head."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conn:
    def __init__(self, sock: socket.socket, turn: int) -> None:
        self.sock = sock
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.phase = Phase.HEAD
        self.deadline = 0.0  # of the current phase (0: none)
        self.turn = turn  # the server loop's turn that accepted it
        self.got_bytes = False  # part of a head has come (else closing it is no error)
        self.target = b""  # of the request being answered, for the log
        self.close_after = False
        self.closed = False
        self.out = bytearray()
        self._pending: h11.Request | None = None  # a head whose end of message is due
        # while HELD
        self.hold: Hold | None = None
        self.unwatch: Callable[[], None] | None = None
        self.checking = False  # a check is on the pool
        self.recheck = False  # woken while checking: check again
        self.final_due = False  # the deadline has come: the next check answers

    def receive(self) -> bool:
        """Read what has arrived; False if nothing had (a spurious wake-up)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return False
        except OSError as err:
            raise Gone from err
        if not data and self.phase is not Phase.HEAD:
            raise Gone  # left while its answer was being made (a FIN: treated as gone)
        self.got_bytes = self.got_bytes or bool(data)
        self.http.receive_data(data)
        if self.phase is not Phase.HEAD and self.buffered > MAX_HEAD_BYTES:
            raise Gone  # pipelining far ahead of its answers: not a client we keep
        return True

    @property
    def buffered(self) -> int:
        return len(self.http.trailing_data[0])

    def next_request(self) -> h11.Request | None:
        """The next complete request, or None until more bytes come. A request with a body
        is returned at once, marked `close_after`: its body is never read."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as err:
                if self.http.trailing_data[1]:  # the client closed half-way through a head
                    raise Gone from err
                raise BadHead(err.error_status_hint, str(err)) from err
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.ConnectionClosed):
                raise Gone
            if isinstance(event, h11.Request):
                if _has_body(event):
                    self.close_after = True
                    return event
                self._pending = event
            elif isinstance(event, h11.EndOfMessage) and self._pending is not None:
                request, self._pending = self._pending, None
                return request

    def queue_answer(self, answer: Answer, keep_alive_s: int) -> None:
        """Encode `answer` into `out` (to be flushed)."""
        keep = ("Keep-Alive", f"timeout={keep_alive_s}")
        headers = [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            ("Cache-Control", "no-store"),
            *answer.headers,
            ("Connection", "close") if self.close_after else keep,
        ]
        reason = _reason(answer.status)
        try:
            for event in (
                h11.Response(status_code=answer.status, headers=headers, reason=reason),
                h11.Data(data=answer.body),
                h11.EndOfMessage(),
            ):
                self.out += self.http.send(event) or b""
        except h11.LocalProtocolError as err:  # h11 refuses: this connection is done for
            raise Gone from err

    def flush(self) -> bool:
        """Write what the socket takes now; True once `out` is empty."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            raise Gone from err
        del self.out[:sent]
        return not self.out

    def next_cycle(self) -> bool:
        """After a whole answer: ready for the next request (keep-alive), or False: close."""
        http = self.http
        if self.close_after or http.our_state is not h11.DONE or http.their_state is not h11.DONE:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            return False
        http.start_next_cycle()
        self.target = b""
        return True

    def send_final(self, answer: Answer) -> None:
        """Best effort before closing (displaced, or the server stops): one plain send."""
        head = (
            f"HTTP/1.1 {answer.status} {_reason(answer.status).decode()}\r\n"
            f"Content-Type: {answer.content_type}\r\nContent-Length: {len(answer.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            self.sock.send(head.encode() + answer.body)

    def shown_target(self) -> str | None:
        """The request target for a log field: bounded, every byte shown."""
        if not self.target:
            return None
        shown = self.target[:256].decode("utf-8", "backslashreplace")
        return shown + "..." if len(self.target) > 256 else shown


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
