"""The HTTP surface: /healthz, /readyz, /metrics and GET /v1/files/<relative path>[?wait=S].

Standard library only (ThreadingHTTPServer): a handful of GET routes, one thread per request,
so a request holding on ``?wait`` never blocks a scrape. Every answer but /metrics is JSON.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

from watcher.verdicts import FileStatus

FILES_PREFIX = "/v1/files/"
REQUEST_TIMEOUT_S = 10.0  # reading a request; a slow client does not hold a thread forever


class Backend(Protocol):
    max_wait_s: float

    def healthz(self) -> tuple[bool, dict[str, Any]]: ...
    def readyz(self) -> tuple[bool, dict[str, Any]]: ...
    def render_metrics(self) -> bytes: ...
    def file_status(self, rel: str, wait_s: float) -> FileStatus: ...


class BadRequest(ValueError):
    """A request the client must fix (400)."""


def parse_file_path(raw: str) -> str:
    """The uploads-relative path from the URL (percent-decoded, as bytes: any file name works).

    >>> parse_file_path("2026/report%20v2.pdf")
    '2026/report v2.pdf'
    """
    data = unquote_to_bytes(raw)
    if b"\0" in data:
        raise BadRequest("NUL byte in path")
    rel = os.fsdecode(data)
    if rel.startswith("/"):
        raise BadRequest("absolute path: give the path relative to the uploads directory")
    parts = rel.split("/")
    if ".." in parts:
        raise BadRequest("'..' is not allowed in a path")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise BadRequest("empty path")
    return "/".join(parts)


def parse_wait(query: str, max_wait_s: float) -> float:
    values = parse_qs(query).get("wait")
    if not values:
        return 0.0
    try:
        wait_s = float(values[-1])
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    if not math.isfinite(wait_s) or wait_s < 0:
        raise BadRequest("wait must be a number of seconds >= 0")
    return min(wait_s, max_wait_s)


class ApiServer:
    def __init__(self, host: str, port: int, backend: Backend) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.backend = backend
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="watcher-http", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    backend: Backend


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "watcher"
    sys_version = ""

    def do_GET(self) -> None:
        try:
            self._route()
        except BadRequest as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except Exception:
            logger.bind(event="http.error", path=self.path).exception("request failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _route(self) -> None:
        backend = self.server.backend
        url = urlsplit(self.path)
        if url.path.startswith(FILES_PREFIX):
            rel = parse_file_path(url.path[len(FILES_PREFIX) :])
            wait_s = parse_wait(url.query, backend.max_wait_s)
            self._json(HTTPStatus.OK, backend.file_status(rel, wait_s).to_json())
        elif url.path == "/healthz":
            ok, body = backend.healthz()
            self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif url.path == "/readyz":
            ok, body = backend.readyz()
            self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif url.path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, backend.render_metrics())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(body).encode() + b"\n")

    def _send(self, status: HTTPStatus, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes every few seconds would drown the events that matter."""
