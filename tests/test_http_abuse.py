"""The HTTP API under abuse: slow heads, connection floods, waiter floods, broken requests and
clients that vanish. Real sockets against a real daemon on a real clamd; where descriptors
must run out, a `python -m watcher run` subprocess with a low RLIMIT_NOFILE.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import ROOT
from harness.daemon import DaemonProcess
from harness.events import wait_until
from harness.files import files_under
from harness.http_client import Slowloris, address, connect, get, raw_request, read_response, reset
from harness.proc import cpu_seconds
from watcher.service import Service

Start = Callable[..., Service]


def wait_request(rel: str, wait_s: int = 30) -> bytes:
    return f"GET /v1/files/{rel}?wait={wait_s} HTTP/1.1\r\nHost: watcher\r\n\r\n".encode()


def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(start_daemon: Start) -> None:
    daemon = start_daemon(http_header_timeout_s=1)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with connect(address(daemon)) as sock:
        started = time.monotonic()
        sock.settimeout(0.1)
        answer = b""
        for byte in head:  # a byte every 0.1 s: each recv sees progress, the head never ends
            try:
                sock.send(bytes([byte]))
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
        held_s = time.monotonic() - started
    assert held_s < 3, f"the server kept a trickling head for {held_s:.1f}s"
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_waiters_beyond_the_bound_get_503_at_once_and_liveness_still_answers(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon(http_max_waiters=3)
    addr = address(daemon)
    held = [connect(addr) for _ in range(3)]
    for n, sock in enumerate(held):
        sock.sendall(wait_request(f"held-{n}.txt"))
    wait_until(lambda: daemon.ops.verdicts.waiting == 3, 10, "three waiting requests")

    started = time.monotonic()
    refused = get(daemon, "/v1/files/one-too-many.txt?wait=30", timeout_s=5)
    assert refused.status == 503 and refused.content_type == "application/json"
    assert "waiting" in refused.json()["error"]
    assert time.monotonic() - started < 3  # refused, not held
    assert get(daemon, "/healthz", timeout_s=5).status == 200
    assert get(daemon, "/v1/files/held-0.txt").json()["state"] == "unknown"  # no wait: served

    (dirs["uploads"] / "held-1.txt").write_bytes(b"fine")
    answer = read_response(held[1])
    assert answer.status == 200 and answer.json()["state"] == "clean"
    for sock in held:
        sock.close()
    wait_until(lambda: daemon.ops.verdicts.waiting == 0, 10, "the waiters to be released")
    late = get(daemon, "/v1/files/held-1.txt?wait=5", timeout_s=10)
    assert late.status == 200 and late.json()["state"] == "clean"


def test_waiting_requests_hold_no_thread_each(start_daemon: Start) -> None:
    daemon = start_daemon(http_max_waiters=200, http_max_connections=400)
    before = threading.active_count()
    held = [connect(address(daemon)) for _ in range(100)]
    try:
        for n, sock in enumerate(held):
            sock.sendall(wait_request(f"w{n}.txt"))
        wait_until(lambda: daemon.ops.verdicts.waiting == 100, 15, "100 waiting requests")
        assert threading.active_count() - before < 10
    finally:
        for sock in held:
            sock.close()


def test_a_waiter_whose_client_left_frees_its_place(start_daemon: Start) -> None:
    daemon = start_daemon(http_max_waiters=1)
    sock = connect(address(daemon))
    sock.sendall(wait_request("gone.txt"))
    wait_until(lambda: daemon.ops.verdicts.waiting == 1, 10, "the request to wait")
    reset(sock)
    wait_until(lambda: daemon.ops.verdicts.waiting == 0, 5, "the waiter to be dropped")
    assert get(daemon, "/v1/files/next.txt?wait=0.2").json()["state"] == "unknown"


def test_a_connection_flood_cannot_lock_liveness_out(start_daemon: Start) -> None:
    daemon = start_daemon(http_max_connections=16, http_header_timeout_s=30)
    addr = address(daemon)
    with Slowloris(addr, count=100, interval_s=0.2) as attack:
        wait_until(lambda: attack.opened >= 100, 20, "the attacker's connections")
        for _ in range(5):
            started = time.monotonic()
            assert get(addr, "/healthz", timeout_s=5).status == 200
            assert time.monotonic() - started < 2
        assert get(addr, "/readyz", timeout_s=5).status == 200
        assert daemon.ops.server is not None and daemon.ops.server.connections <= 16 + 1


def test_keep_alive_answers_several_requests_on_one_connection(start_daemon: Start) -> None:
    daemon = start_daemon()
    with connect(address(daemon)) as sock:
        for path in ("/healthz", "/v1/files/a.txt", "/metrics"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: watcher\r\n\r\n".encode())
            assert read_response(sock).status == 200


def test_trickling_connections_cannot_take_the_descriptors_scans_need(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    """Issue 13.5 as reported: nofile 256, 300 trickling connections."""
    env = {**subprocess_env, "WATCHER_HTTP_HEADER_TIMEOUT_S": "3"}
    daemon = DaemonProcess(env, nofile=256).start()
    assert daemon.proc is not None
    try:
        addr = daemon.http_address
        with Slowloris(addr, count=300, interval_s=0.3) as attack:
            wait_until(lambda: attack.opened + attack.refused >= 300, 30, "300 connection tries")
            started = time.monotonic()
            assert get(addr, "/healthz", timeout_s=5).status == 200
            assert time.monotonic() - started < 2
            names = [f"f{n:02}.txt" for n in range(30)]
            for name in names:
                (dirs["uploads"] / name).write_bytes(name.encode())
            wait_until(
                lambda: len(files_under(dirs["processed"])) == len(names), 30, "every delivery"
            )
            cpu_before, wall_before = cpu_seconds(daemon.proc.pid), time.monotonic()
            time.sleep(2)  # a window to measure: the accept loop must not spin
            busy = (cpu_seconds(daemon.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
            assert busy < 0.6, f"the idle daemon under attack used {busy:.0%} of a core"
    finally:
        assert daemon.terminate() == 0
    assert files_under(dirs["processed"]) == {n: n.encode() for n in names}
    assert daemon.raw_lines() == []
    assert not daemon.events.named("file.retry") and not daemon.events.named("http.error")


def test_errors_and_vanishing_clients_leave_only_json_lines(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    """Issue 11.6: every error is a 4xx/5xx with one JSON log line; nothing else is printed."""
    daemon = DaemonProcess(subprocess_env).start()
    try:
        addr = daemon.http_address
        bad = {
            "/v1/files/" + "a" * 300: 400,  # longer than a file name can be: it was 500
            "/v1/files/" + "a/" * 2100: 400,  # longer than a path can be
            "/v1/files/%ff%fe.txt?wait=x": 400,
        }
        for path, status in bad.items():
            response = get(addr, path)
            assert response.status == status, path
            assert response.json()["error"]
        garbage = [
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # TLS hello
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
            (b"POST /v1/files/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        ]
        for data, status in garbage:
            response = raw_request(addr, data)
            assert response.status == status, data[:40]
            assert response.json()["error"]

        # Clients that leave mid-answer: a held wait whose verdict comes after the client reset,
        # and scrapes reset right after asking.
        sock = connect(addr)
        sock.sendall(wait_request("late.txt"))
        (dirs["uploads"] / "late.txt").write_bytes(b"late")
        reset(sock)
        for _ in range(20):
            sock = connect(addr)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reset(sock)
        daemon.events.wait_for("file.clean", path="late.txt")
        assert get(addr, "/healthz").status == 200
    finally:
        assert daemon.terminate() == 0

    assert daemon.raw_lines() == []
    errors = daemon.events.named("http.client_error")
    assert len(errors) == len(bad) + len(garbage)
    assert sorted(e["status"] for e in errors) == sorted([*bad.values(), *(s for _, s in garbage)])
    assert not daemon.events.named("http.error")  # a client leaving is not our error


def test_the_listening_socket_survives_a_client_that_never_reads(start_daemon: Start) -> None:
    """A client that asks for /metrics and never reads is cut off; others are served."""
    daemon = start_daemon(http_header_timeout_s=1)
    addr = address(daemon)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.connect(addr)
    try:
        for _ in range(200):  # pipelined: answers pile up in a window the client never opens
            stuck.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get(addr, "/healthz", timeout_s=5).status == 200
        wait_until(
            lambda: daemon.ops.server is not None and daemon.ops.server.connections == 0,
            10, "the stuck client to be cut off",
        )  # fmt: skip
    finally:
        stuck.close()


# The server alone in a process whose descriptors are all taken once it listens: only the
# backend is a stand-in (the seam), sockets, limits and the process are real.
_FULL_PROCESS = """
import json, os, resource, sys
from watcher.ops.server import HttpServer, Limits
from watcher.logs import configure_logging

class Backend:
    max_wait_s = 1.0
    def healthz(self):
        return True, {"alive": True}

configure_logging("json", "INFO")
server = HttpServer("127.0.0.1", 0, Backend(), Limits(64, 8, 5.0))
server.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
taken = []
try:
    while True:
        taken.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print(json.dumps({"event": "test.full", "port": server.address[1]}), flush=True)
sys.stdin.readline()
for fd in taken:
    os.close(fd)
sys.stdin.readline()
server.close()
"""


def test_accept_failing_with_emfile_pauses_instead_of_spinning() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _FULL_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    try:
        lines.append(proc.stdout.readline())
        addr = ("127.0.0.1", json.loads(lines[0])["port"])
        waiting = [connect(addr) for _ in range(5)]  # in the kernel's backlog
        for sock in waiting:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        lines.append(proc.stdout.readline())
        assert json.loads(lines[1])["event"] == "http.accept_failed"
        cpu_before, wall_before = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.5)  # a window to measure: EMFILE must not make the loop spin
        busy = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - wall_before)
        assert busy < 0.3, f"the accept loop used {busy:.0%} of a core"

        proc.stdin.write("free\n")
        proc.stdin.flush()
        for sock in waiting:  # served once descriptors are back, without being asked again
            assert read_response(sock).status == 200
            sock.close()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        lines += proc.stdout.readlines()
    for line in lines:
        assert json.loads(line)["event"], line  # nothing but JSON lines
