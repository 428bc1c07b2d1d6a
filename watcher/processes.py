"""Scan processes: one `watcher run` using more than one core.

One daemon process keeps about 1.25 cores busy whatever the host has (the interpreter's lock,
and the system calls each file needs). With WATCHER_PROCESSES=N, `watcher run` starts N-1
scan processes beside its own daemon; each takes the uploads whose path hashes to its index
(`daemon.Partition`), with today's claim protocol underneath (a claim is a rename: a file is
never taken twice, and a dead process's claims are adopted by the others' sweeps).

The first process keeps what is said once: HTTP, metrics, the verdict lookup, the jobs and the
heartbeat. The others send it, on a pipe of their own, one JSON line per final result (fed to
the same listeners as its own results), and once a second their state (queue, in flight,
failing destinations, distrust of clamd) and how many of each event they logged. A scan
process that exits is started again with backoff (`process.exited`); one whose parent is gone
(its stdin closes) stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from watcher.daemon import Daemon, Partition
from watcher.logs import emit, notify_observers, observe_events
from watcher.pipeline import Result
from watcher.settings import Settings
from watcher.verdict import Outcome

STATE_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
BRIDGE_FD = 3  # where a scan process writes its lines


def auto_count(cpus: int | None) -> int:
    """Scan processes for a host with `cpus` cores when WATCHER_PROCESSES is 0: one per four
    cores. A process keeps about 1.25 cores busy; clamd needs more per file than the daemon
    does (1.5 ms against 1 ms with the test signatures; several times that with production
    ones), and shares the host when it is local.

    >>> [auto_count(n) for n in (1, 2, 4, 8, 16, 64)]
    [1, 1, 1, 2, 4, 16]
    """
    return max(1, (cpus or 1) // 4)


# -- what travels on the bridge ----------------------------------------------------------------


def result_line(result: Result) -> bytes:
    body = {
        "outcome": result.outcome.value,
        "rel": result.rel,
        "dest": None if result.dest is None else os.fsdecode(result.dest),
        "size": result.size,
        "sha256": result.sha256,
        "signature": result.signature,
        "reason": result.reason,
        "cause": result.cause,
        "duration_ms": result.duration_ms,
        "repeat": bool(result.fields.get("repeat")),
    }
    return (
        json.dumps({"result": body}, ensure_ascii=False, default=str).encode(
            "utf-8", "surrogateescape"
        )
        + b"\n"
    )


def result_from(body: dict[str, Any]) -> Result:
    return Result(
        Outcome(body["outcome"]),
        body["rel"],
        dest=None if body["dest"] is None else Path(body["dest"]),
        size=body["size"],
        sha256=body["sha256"],
        signature=body["signature"],
        reason=body["reason"],
        cause=body["cause"],
        duration_ms=body["duration_ms"],
        fields={"repeat": True} if body.get("repeat") else {},
    )


# -- the first process's side --------------------------------------------------------------


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0


class ScanProcesses:
    """Starts, watches and stops scan processes 1..count-1 (the caller's daemon is 0)."""

    def __init__(self, settings: Settings, count: int, publish: Callable[[Result], None]) -> None:
        # The scan processes get the very settings we run with (not the environment again:
        # an embedding caller may have built them otherwise).
        self._settings_json = settings.dump_for_child()
        self.count = count
        self._publish = publish
        self._children = [_Child(i) for i in range(1, count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        for child in self._children:
            self._spawn(child)
        self._monitor = threading.Thread(target=self._watch, name="watcher-processes", daemon=True)
        self._monitor.start()

    def _spawn(self, child: _Child) -> None:
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        argv = [
            sys.executable,
            "-m",
            "watcher",
            "run",
            "--partition",
            f"{child.index}/{self.count}",
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            pass_fds=(write_fd,),
            env={
                **os.environ,
                "WATCHER_BRIDGE_FD": str(write_fd),
                "WATCHER_SCAN_SETTINGS": self._settings_json,
            },
        )
        os.close(write_fd)
        with self._lock:
            child.proc, child.state = proc, {}
        reader = os.fdopen(read_fd, "rb")
        threading.Thread(
            target=self._read,
            args=(child, reader),
            name=f"watcher-bridge-{child.index}",
            daemon=True,
        ).start()

    def _read(self, child: _Child, lines: IO[bytes]) -> None:
        with lines:
            for line in lines:
                try:
                    message = json.loads(line.decode("utf-8", "surrogateescape"))
                    if "result" in message:
                        self._publish(result_from(message["result"]))
                    elif "state" in message:
                        with self._lock:
                            child.state = message["state"]
                        for key, count in message["state"].get("events", {}).items():
                            name, _, level = key.partition("|")
                            notify_observers(name, level, count)
                except Exception:  # a bad line costs that line, not the bridge
                    emit("listener.error", exception=True)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for child in self._children:
                proc = child.proc
                if proc is None or proc.poll() is None:
                    continue
                emit("process.exited", index=child.index, exit_code=proc.returncode)
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                child.restarts += 1
                if self._stopping.wait(delay):
                    return
                self._spawn(child)

    def definitions_reloaded(self) -> None:
        """Tell every scan process (it checks clamd again and forgets its VERSION)."""
        for child in self._children:
            proc = child.proc
            if proc is not None and proc.stdin is not None and proc.poll() is None:
                try:
                    proc.stdin.write(b"reloaded\n")
                    proc.stdin.flush()
                except OSError:
                    continue  # exited meanwhile: a new one checks clamd at start anyway

    def signal_stop(self) -> None:
        """Ask every scan process to drain and stop (they do it in parallel with us)."""
        self._stopping.set()
        for child in self._children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for child in self._children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdin is not None:
                child.proc.stdin.close()

    # -- their state, summed ------------------------------------------------------------------

    def alive(self) -> bool:
        return all(c.proc is not None and c.proc.poll() is None for c in self._children)

    def reporting(self) -> bool:
        """Every scan process has started and said how it is (at least once)."""
        return self.alive() and all(self._states())

    def _states(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c.state) for c in self._children]

    def queue_depth(self) -> int:
        return sum(int(s.get("queue", 0)) for s in self._states())

    def in_flight(self) -> int:
        return sum(int(s.get("in_flight", 0)) for s in self._states())

    def failing_destinations(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for state in self._states():
            found.update(state.get("failing", {}))
        return found

    def clamd_distrust(self) -> str | None:
        return next((s["distrust"] for s in self._states() if s.get("distrust")), None)


# -- a scan process's side -----------------------------------------------------------------


class _Bridge:
    """The scan process's end of the pipe: results as they come, state once a second."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self._events: Counter[str] = Counter()

    def result(self, result: Result) -> None:
        self._send(result_line(result))

    def event(self, name: str, level: str) -> None:
        with self._lock:
            self._events[f"{name}|{level}"] += 1

    def state(self, daemon: Daemon) -> None:
        with self._lock:
            events, self._events = self._events, Counter()
        body = {
            "queue": daemon.queue_depth(),
            "in_flight": daemon.in_flight,
            "failing": daemon.failing_destinations(),
            "distrust": daemon.clamd_distrust(),
            "events": dict(events),
        }
        self._send(json.dumps({"state": body}).encode() + b"\n")

    def _send(self, line: bytes) -> None:
        # The first process gone: our stdin closes too, and we stop.
        with self._lock, contextlib.suppress(OSError):
            self._out.write(line)


def run_scan_process(settings: Settings, partition: Partition) -> int:
    """`watcher run --partition I/N`, started by the first process; not for people."""
    if os.environ.get("WATCHER_SCAN_SETTINGS"):
        settings = Settings.model_validate_json(os.environ["WATCHER_SCAN_SETTINGS"])
    bridge = _Bridge(int(os.environ.get("WATCHER_BRIDGE_FD", BRIDGE_FD)))
    daemon = Daemon(settings, partition=partition)
    daemon.add_listener(bridge.result)
    stop_observing = observe_events(bridge.event)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop_event.set())
    daemon.start()
    threading.Thread(target=_commands, args=(daemon,), daemon=True).start()
    while not daemon.stop_event.wait(STATE_EVERY_S):
        bridge.state(daemon)
    daemon.close()
    bridge.state(daemon)
    stop_observing()
    return 0


def _commands(daemon: Daemon) -> None:
    """Lines from the first process; its end closing means it is gone: stop.

    Read with os.read, not sys.stdin: a daemon thread blocked in a buffered reader makes the
    interpreter abort at exit ("could not acquire lock for <stdin>").
    """
    pending = b""
    while data := os.read(0, 4096):
        pending += data
        *lines, pending = pending.split(b"\n")
        if b"reloaded" in lines:
            daemon.definitions_reloaded()
    daemon.stop_event.set()
