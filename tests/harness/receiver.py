"""A real HTTP receiver on loopback for webhooks and Apprise's json:// notifications.

It records every POST (headers, body); it can answer with another status, be slow, and be
stopped and started again on the same port (a receiver that is down, then back). With `answer`,
each POST goes to that function instead, which keeps what it needs and returns the status (the
soak's receiver: bench/soak/webhooks.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness.net import free_port


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(
        self,
        port: int | None = None,
        status: int = 200,
        delay_s: float = 0.0,
        answer: Callable[[dict[str, str], bytes], int] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.status = status
        self.delay_s = delay_s
        self.answer = answer
        self.posts: list[Post] = []
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as most receivers do

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                time.sleep(receiver.delay_s)
                if receiver.answer is not None:
                    status = receiver.answer(dict(self.headers), body)
                else:
                    status = receiver.status
                    with receiver._cond:
                        post = Post(self.path, dict(self.headers), body, time.time())
                        receiver.posts.append(post)
                        receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[Post]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.posts) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.posts)}/{count} posts within {timeout_s}s")
                self._cond.wait(left)
            return list(self.posts)
