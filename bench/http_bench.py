"""`make bench-http`: the HTTP API's requests/s, and the daemon's delivery rate while the API
is abused, for this checkout and (A/B) for an earlier revision of it.

Each round starts `watcher run` from each source in turn, alternating (the machine is shared:
only figures taken side by side compare), on one clamd (4 threads, DisableCache yes):

- requests/s: 4 client threads for `--seconds`, a new connection per request (the only way
  the old server serves), then, where the server keeps connections alive, one per thread;
- delivery: 1,000 small files moved into uploads, with the API left alone, while 300
  `?wait=25` requests are held (each asked again when answered; after a 503, after its
  Retry-After), and while 300 connections trickle request heads (slowloris); with /healthz
  latency asked during that last one.

Prints a table of medians over the rounds and writes bench/results/http.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchlib import RESULTS, ROOT, Watcher, bench_clamd, export, move_all, small_files
from harness.clamd import Clamd
from harness.http_client import Slowloris
from harness.net import free_port
from harness.proc import cpu_seconds

Addr = tuple[str, int]


def requests_per_s(addr: Addr, path: str, seconds: float, keep_alive: bool) -> float:
    """Answers per second to 4 threads asking as fast as they can."""
    counts = [0] * 4
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        while time.monotonic() < stop:
            if not keep_alive:
                conn = http.client.HTTPConnection(*addr, timeout=10)
            conn.request("GET", path)
            conn.getresponse().read()
            counts[n] += 1
            if not keep_alive:
                conn.close()
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


class Waiters:
    """`count` held `?wait=25` requests on paths no upload has; each is asked again when
    answered (after its Retry-After when refused). One thread, non-blocking sockets."""

    def __init__(self, addr: Addr, count: int) -> None:
        self.addr, self.count = addr, count
        self.answers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Waiters:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _ask(self, sel: selectors.BaseSelector, n: int) -> None:
        sock = socket.create_connection(self.addr, timeout=5)
        sock.sendall(f"GET /v1/files/absent-{n}.txt?wait=25 HTTP/1.0\r\n\r\n".encode())
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, (n, bytearray()))

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        later: list[tuple[float, int]] = []
        for n in range(self.count):
            self._ask(sel, n)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                n, got = key.data
                sock: Any = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                got += chunk
                if chunk:
                    continue
                sel.unregister(sock)
                sock.close()
                status = int(got[9:12] or b"0")
                self.answers[status] = self.answers.get(status, 0) + 1
                later.append((time.monotonic() + (1.0 if status == 503 else 0.0), n))
            now = time.monotonic()
            for at, n in [x for x in later if x[0] <= now]:
                later.remove((at, n))
                self._ask(sel, n)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def healthz_ms(addr: Addr, times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection(*addr, timeout=5)
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        out.append((time.monotonic() - started) * 1000 if ok else float("inf"))
        time.sleep(0.2)
    return out


def deliver(daemon: Watcher, base: Path, files: int, start: int) -> tuple[float, float]:
    """Files/s for `files` small files, and the daemon's CPU seconds per 1,000 files."""
    staging = base / f"src-{start}"
    small_files(staging, files, start)
    before, cpu_before = daemon.delivered, cpu_seconds(daemon.pid)
    started = move_all(staging, daemon.uploads)
    finished = daemon.wait_delivered(before + files, 600)
    cpu = cpu_seconds(daemon.pid) - cpu_before
    return files / (finished - started), 1000 * cpu / files


@contextmanager
def nothing() -> Iterator[None]:
    yield


def one_run(source: Path, clamd: Clamd, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    addr = ("127.0.0.1", port)
    os.chdir(source)  # `python -m watcher` looks in the working directory first
    limits = {}
    if args.max_waiters:  # an older revision ignores these
        limits = {
            "WATCHER_HTTP_MAX_WAITERS": str(args.max_waiters),
            "WATCHER_HTTP_MAX_CONNECTIONS": str(2 * args.max_waiters + 100),
        }
    daemon = Watcher(
        base, clamd, PYTHONPATH=str(source), WATCHER_HTTP_ADDR=f"127.0.0.1:{port}",
        WATCHER_SETTLE_S="0.2", **limits,
    )  # fmt: skip
    result: dict[str, Any] = {}
    try:
        result["rps_lookup"] = requests_per_s(addr, "/v1/files/x.txt", args.seconds, False)
        result["rps_healthz"] = requests_per_s(addr, "/healthz", args.seconds, False)
        try:
            result["rps_lookup_keepalive"] = requests_per_s(
                addr, "/v1/files/x.txt", args.seconds, True
            )
        except (OSError, http.client.HTTPException):
            result["rps_lookup_keepalive"] = None  # the server closes after each answer
        abuses: dict[str, Callable[[], Any]] = {
            "quiet": nothing,
            "waiters": lambda: Waiters(addr, 300),
            "slowloris": lambda: Slowloris(addr, 300, interval_s=0.5),
        }
        for n, (name, abuse) in enumerate(abuses.items()):
            with abuse() as attacker:
                if attacker is not None:
                    time.sleep(2)  # let it take hold
                rate, cpu_ms = deliver(daemon, base, args.files, (n + 1) * 100_000)
                result[f"deliver_{name}_files_per_s"] = rate
                result[f"deliver_{name}_cpu_ms_per_file"] = cpu_ms
                if name == "slowloris":
                    result["healthz_ms_under_slowloris"] = healthz_ms(addr, 10)
                if name == "waiters":
                    result["waiter_answers"] = dict(attacker.answers)
        result["threads_at_end"] = len(os.listdir(f"/proc/{daemon.pid}/task"))
    finally:
        daemon.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", default="94896ef", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--max-waiters",
        type=int,
        default=0,
        help="WATCHER_HTTP_MAX_WAITERS for the runs (default: the setting's default)",
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="watcher-http-bench-", dir="/var/tmp"))
    sources = {args.compare: export(args.compare, base / "old"), "this checkout": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    clamd = bench_clamd(base / "clamd")
    try:
        for r in range(args.rounds):
            for name, source in sources.items():
                run = one_run(source, clamd, base / f"run-{r}-{len(runs[name])}-{name[:6]}", args)
                runs[name].append(run)
                print(f"round {r + 1} {name}: {json.dumps(run)}", flush=True)
    finally:
        clamd.stop()
        shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"http-waiters-{args.max_waiters}.json" if args.max_waiters else "http.json"
    (RESULTS / name).write_text(json.dumps(runs, indent=2))
    print_table(runs)
    return 0


def median(runs: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "n/a"
    if isinstance(values[0], list):
        values = [max(v) for v in values]
    return f"{statistics.median(values):.1f}"


def print_table(runs: dict[str, list[dict[str, Any]]]) -> None:
    keys = [
        "rps_lookup", "rps_healthz", "rps_lookup_keepalive",
        "deliver_quiet_files_per_s", "deliver_waiters_files_per_s",
        "deliver_slowloris_files_per_s", "deliver_quiet_cpu_ms_per_file",
        "deliver_waiters_cpu_ms_per_file", "deliver_slowloris_cpu_ms_per_file",
        "healthz_ms_under_slowloris", "threads_at_end",
    ]  # fmt: skip
    names = list(runs)
    print(f"{'median of ' + str(len(runs[names[0]])) + ' rounds':<36}" + "".join(
        f"{n:>18}" for n in names))  # fmt: skip
    for key in keys:
        print(f"{key:<36}" + "".join(f"{median(runs[n], key):>18}" for n in names))
    print("(healthz_ms_under_slowloris: the slowest of 10 answers; inf: one did not come in 5 s)")


if __name__ == "__main__":
    raise SystemExit(main())
