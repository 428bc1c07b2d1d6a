"""GET /v1/files/<path>[?wait=S]: the app asks what became of its upload, and can wait for it."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.events import wait_until
from harness.http_client import Response, get
from watcher.ops.verdicts import FileStatus, Verdicts
from watcher.service import Service
from watcher.settings import Settings

Start = Callable[..., Service]


def in_background(fn: Callable[[], Response]) -> tuple[threading.Thread, list[Response]]:
    out: list[Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_wait_returns_the_verdict_of_a_file_written_after_the_request_started(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    started = time.monotonic()
    thread, out = in_background(lambda: get(daemon, "/v1/files/in/report%20v2.txt?wait=20"))
    wait_until(lambda: daemon.ops.verdicts.waiting == 1, 10, "the request to be waiting")
    (dirs["uploads"] / "in").mkdir()
    (dirs["uploads"] / "in" / "report v2.txt").write_bytes(b"numbers")
    thread.join(timeout=25)
    (response,) = out
    assert response.status == 200
    body: dict[str, Any] = response.json()
    assert body["state"] == "clean"
    assert body["path"] == "in/report v2.txt"
    assert body["location"] == "processed/in/report v2.txt"
    assert body["sha256"] == hashlib.sha256(b"numbers").hexdigest()
    assert body["scanned_at"] and body["signature"] is None
    assert time.monotonic() - started < 20  # answered on the verdict, not at the time limit


def test_wait_on_an_infected_upload_names_the_signature_and_quarantine_id(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    (dirs["uploads"] / "bad.com").write_bytes(EICAR)
    body = get(daemon, "/v1/files/bad.com?wait=20").json()
    assert body["state"] == "infected" and body["signature"]
    qid = body["location"].removeprefix("quarantine/")
    assert (dirs["quarantine"] / qid).read_bytes() == EICAR


def test_lookup_without_wait_answers_at_once(start_daemon: Start, dirs: dict[str, Path]) -> None:
    daemon = start_daemon(settle_s=30)
    assert get(daemon, "/v1/files/never-seen.txt").json()["state"] == "unknown"
    with open(dirs["uploads"] / "open.txt", "wb") as f:  # still being written
        f.write(b"half")
        f.flush()
        body = get(daemon, "/v1/files/open.txt").json()
    assert body["state"] == "pending" and body["location"] == "uploads/open.txt"


def test_wait_is_bounded_and_answers_with_the_state_it_has(start_daemon: Start) -> None:
    daemon = start_daemon(http_max_wait_s=0.5)
    started = time.monotonic()
    body = get(daemon, "/v1/files/nothing.txt?wait=3600").json()
    assert body["state"] == "unknown"
    assert 0.4 < time.monotonic() - started < 5


def test_a_symlink_upload_is_rejected(start_daemon: Start, dirs: dict[str, Path]) -> None:
    daemon = start_daemon()
    (dirs["uploads"] / "link").symlink_to("/etc/passwd")
    body = get(daemon, "/v1/files/link?wait=10").json()
    assert body["state"] == "rejected" and body["reason"] == "symlink"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/../../etc/passwd",
        "/v1/files/a/../../etc/passwd",
        "/v1/files/%2e%2e/%2e%2e/etc/passwd",
        "/v1/files/a%2F..%2F..%2Fetc",
        "/v1/files//etc/passwd",
        "/v1/files/%2Fetc%2Fpasswd",
        "/v1/files/a%00b",
        "/v1/files/",
        "/v1/files/x?wait=-1",
        "/v1/files/x?wait=soon",
        "/v1/files/x?wait=nan",
    ],
)
def test_traversal_absolute_nul_and_bad_waits_are_400(start_daemon: Start, path: str) -> None:
    response = get(start_daemon(), path)
    assert response.status == 400
    assert response.json()["error"]


def test_the_staging_area_is_not_visible(start_daemon: Start) -> None:
    daemon = start_daemon()
    assert get(daemon, "/v1/files/.watcher/held").json()["state"] == "unknown"


def test_a_file_being_scanned_is_pending_even_when_its_name_had_a_verdict(
    make_settings: Callable[..., Settings], own_clamd: Clamd, dirs: dict[str, Path]
) -> None:
    daemon = Service(make_settings(clamav_socket=own_clamd.socket))
    daemon.start()
    upload = dirs["uploads"] / "a.txt"
    try:
        upload.write_bytes(b"first")
        assert get(daemon, "/v1/files/a.txt?wait=20").json()["state"] == "clean"
        own_clamd.freeze()  # the next scan hangs: the file sits claimed, in staging
        upload.write_bytes(b"second")
        wait_until(lambda: not upload.exists(), 10, "the second upload to be claimed")
        body = get(daemon, "/v1/files/a.txt").json()
        assert body["state"] == "pending" and body["location"] is None
        own_clamd.thaw()
        body = get(daemon, "/v1/files/a.txt?wait=20").json()
        assert body["state"] == "clean" and body["sha256"] == hashlib.sha256(b"second").hexdigest()
        assert body["location"] == "processed/a (1).txt"
    finally:
        own_clamd.thaw()
        daemon.close()


@pytest.mark.parametrize(
    "rel", ["a" * 300, "d/" * 2100 + "f", "loop/x"], ids=["name", "path", "symlink-loop"]
)
def test_lookup_of_a_path_no_file_can_have_is_unknown_not_an_error(
    tmp_path: Path, rel: str
) -> None:
    """ENAMETOOLONG, ELOOP: the lookup answers; it used to raise (a 500 with a traceback)."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "loop").symlink_to("loop")
    verdicts = Verdicts(uploads, tmp_path / "processed", uploads / ".watcher")
    assert verdicts.lookup(rel) == FileStatus(rel, "unknown")


def test_a_recorded_verdict_wakes_only_the_watchers_of_its_path(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    woken: list[str] = []
    unwatch = [
        daemon.ops.verdicts.watch(f"f{n}.txt", partial(woken.append, f"f{n}.txt"))
        for n in range(50)
    ]
    (dirs["uploads"] / "f7.txt").write_bytes(b"seven")
    wait_until(lambda: woken, 20, "a wake-up")
    assert get(daemon, "/v1/files/f7.txt?wait=20").json()["state"] == "clean"
    assert woken == ["f7.txt"]
    for stop in unwatch:
        stop()
    assert daemon.ops.verdicts.waiting == 0
