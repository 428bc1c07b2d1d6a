"""The HTTP API's routes: /healthz, /readyz, /metrics, GET /v1/files/<relative path>[?wait=S]
and GET /v1/verdicts/<sha256>.

`route` only parses (on the server's loop thread, so it never blocks) and says how to answer:
an `Answer` now, a `Call` for the server's thread pool (anything that touches clamd or the
disk), or a `Hold` for ``?wait`` (no thread is held; see watcher/httpserver.py). Every answer
but /metrics is JSON; every error is one (``{"error": "..."}``) and is logged once.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote_to_bytes

from prometheus_client import CONTENT_TYPE_LATEST

from watcher.errors import StoreUnavailable
from watcher.ops.verdicts import FileStatus

FILES_PREFIX = b"/v1/files/"
VERDICTS_PREFIX = b"/v1/verdicts/"
SHA256 = re.compile(rb"^[0-9a-f]{64}$")
NAME_MAX_BYTES = 255  # longest file name on Linux file systems (ext4, xfs, tmpfs, overlayfs)
PATH_MAX_BYTES = 4096


class Backend(Protocol):
    max_wait_s: float

    def healthz(self) -> tuple[bool, dict[str, Any]]: ...
    def readyz(self) -> tuple[bool, dict[str, Any]]: ...
    def render_metrics(self) -> bytes: ...
    def file_status(self, rel: str) -> FileStatus: ...
    def watch(self, rel: str, wake: Callable[[], None]) -> Callable[[], None]: ...
    def by_content(self, sha256: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    error: str | None = None  # set for errors: the server logs them (once)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Call:
    """Answer with what `run()` returns, computed on the server's thread pool."""

    run: Callable[[], Answer]


@dataclass(frozen=True, slots=True)
class Hold:
    """Answer later. `check(final)` runs on the pool at once and again each time `watch`'s
    wake fires; it returns None to go on waiting, unless `final` (the deadline has come)."""

    check: Callable[[bool], Answer | None]
    watch: Callable[[Callable[[], None]], Callable[[], None]]
    wait_s: float


def json_answer(status: int, body: dict[str, Any]) -> Answer:
    return Answer(status, json.dumps(body).encode() + b"\n")


def error_answer(status: int, message: str, *headers: tuple[str, str]) -> Answer:
    return Answer(
        status, json.dumps({"error": message}).encode() + b"\n", error=message, headers=headers
    )


class BadRequest(ValueError):
    """A request the client must fix (400)."""


def route(backend: Backend, method: bytes, target: bytes) -> Answer | Call | Hold:
    """How to answer `method target` (the raw request target, bytes as sent)."""
    if method != b"GET":
        return error_answer(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served", ("Allow", "GET"))
    path, _, query = target.partition(b"?")
    try:
        if path.startswith(FILES_PREFIX):
            return _file_route(backend, parse_file_path(path[len(FILES_PREFIX) :]), query)
    except BadRequest as err:
        return error_answer(HTTPStatus.BAD_REQUEST, str(err))
    if path.startswith(VERDICTS_PREFIX):
        digest = path[len(VERDICTS_PREFIX) :].lower()
        if not SHA256.match(digest):
            return error_answer(HTTPStatus.BAD_REQUEST, "not a sha256: 64 hex digits")
        sha256 = digest.decode()
        return Call(
            _unless_store_down(lambda: json_answer(HTTPStatus.OK, backend.by_content(sha256)))
        )
    if path == b"/healthz":  # answered right here: liveness never queues behind the pool
        return _health(*backend.healthz())
    if path == b"/readyz":
        return Call(lambda: _health(*backend.readyz()))
    if path == b"/metrics":
        return Call(lambda: Answer(200, backend.render_metrics(), CONTENT_TYPE_LATEST))
    return error_answer(HTTPStatus.NOT_FOUND, "not found")


def _health(ok: bool, body: dict[str, Any]) -> Answer:
    return json_answer(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)


def _file_route(backend: Backend, rel: str, query: bytes) -> Call | Hold:
    wait_s = parse_wait(query.decode("latin-1"), backend.max_wait_s)

    def check(final: bool) -> Answer | None:
        try:
            status = backend.file_status(rel)
        except StoreUnavailable:
            return store_down() if final else None  # it may be back before the deadline
        return json_answer(HTTPStatus.OK, status.to_json()) if status.final or final else None

    if wait_s <= 0:
        answer = _unless_store_down(lambda: json_answer(200, backend.file_status(rel).to_json()))
        return Call(answer)
    return Hold(check, lambda wake: backend.watch(rel, wake), wait_s)


def store_down() -> Answer:
    """The verdict store (a database) cannot be read now: ask again, nothing is lost."""
    return error_answer(503, "the verdict store is unavailable; ask again", ("Retry-After", "5"))


def _unless_store_down(run: Callable[[], Answer]) -> Callable[[], Answer]:
    def guarded() -> Answer:
        try:
            return run()
        except StoreUnavailable:
            return store_down()

    return guarded


def parse_file_path(raw: bytes) -> str:
    """The uploads-relative path from the URL (percent-decoded, as bytes: any file name works).

    >>> parse_file_path(b"2026/report%20v2.pdf")
    '2026/report v2.pdf'
    """
    data = unquote_to_bytes(raw)
    if b"\0" in data:
        raise BadRequest("NUL byte in path")
    if len(data) > PATH_MAX_BYTES:
        raise BadRequest(f"path longer than {PATH_MAX_BYTES} bytes")
    if data.startswith(b"/"):
        raise BadRequest("absolute path: give the path relative to the uploads directory")
    parts = data.split(b"/")
    if b".." in parts:
        raise BadRequest("'..' is not allowed in a path")
    if any(len(part) > NAME_MAX_BYTES for part in parts):
        raise BadRequest(f"a path segment is longer than {NAME_MAX_BYTES} bytes")
    parts = [p for p in parts if p not in (b"", b".")]
    if not parts:
        raise BadRequest("empty path")
    return os.fsdecode(b"/".join(parts))


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
