"""Test support: a real clamd process, a log-event recorder, a daemon in a subprocess."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from watcher.claims import claimed_files
from watcher.clamav import ClamdScanner
from watcher.errors import ClamdUnavailable

ROOT = Path(__file__).resolve().parent.parent
TESTSIGS = ROOT / "watcher" / "testsigs"
TESTFILES = Path("/usr/share/clamav-testfiles")
# Assembled at run time so no file in the repository is itself EICAR.
EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "") -> Any:
    """Poll a cheap predicate (a stat or a ping) until it holds; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.02)


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    inherit_settings: bool = True,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m watcher ARGS`, from this checkout, with `env` added to the environment.

    ``inherit_settings=False`` drops any WATCHER_*, CLAMAV_* or VIRUS_SCANNING_ENABLED the
    test run itself was started with, so only `env` configures the command.
    """
    base = {
        k: v
        for k, v in os.environ.items()
        if inherit_settings
        or not (k.startswith(("WATCHER_", "CLAMAV_")) or k == "VIRUS_SCANNING_ENABLED")
    }
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def free_port(host: str) -> int:
    """A TCP port nobody listens on at `host` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Clamd:
    """A real clamd with its own config, socket and test signatures under `root`; with
    `tcp_host` it also listens on TCP there (``127.0.0.2``: each loopback address a host)."""

    def __init__(
        self,
        root: Path,
        max_threads: int = 4,
        extra_conf: str = "",
        alert_exceeds_max: bool = True,
        tcp_host: str | None = None,
    ) -> None:
        """Stock settings plus ``AlertExceedsMax yes`` (without it: the official image's)."""
        self.tcp = (tcp_host, free_port(tcp_host)) if tcp_host else None
        if self.tcp is not None:
            extra_conf += f"TCPSocket {self.tcp[1]}\nTCPAddr {self.tcp[0]}\n"
        self.root = root
        self.socket = root / "clamd.sock"
        self.db = root / "db"
        self.conf = root / "clamd.conf"
        self.db.mkdir(parents=True, exist_ok=True)
        for sig in TESTSIGS.iterdir():
            shutil.copy(sig, self.db / sig.name)
        (root / "tmp").mkdir(exist_ok=True)
        self.conf.write_text(
            f"LocalSocket {self.socket}\nDatabaseDirectory {self.db}\nForeground yes\n"
            f"LogFile {root / 'clamd.log'}\nTemporaryDirectory {root / 'tmp'}\n"
            f"MaxThreads {max_threads}\nSelfCheck 3600\n"
            + ("AlertExceedsMax yes\n" if alert_exceeds_max else "")
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of its TCP socket."""
        assert self.tcp is not None
        return f"{self.tcp[0]}:{self.tcp[1]}"

    @property
    def scanner(self) -> ClamdScanner:
        return ClamdScanner(socket_path=self.socket, scan_timeout_s=30, connect_timeout_s=2)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["clamd", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._answers, 30, "clamd to answer PING")

    def _answers(self) -> bool:
        try:
            self.scanner.ping()
        except ClamdUnavailable:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # seen with clients waiting in its full backlog
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.socket.unlink(missing_ok=True)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class Events:
    """Records log events (dicts) and lets a test wait for one."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def add(self, record: dict[str, Any]) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if _matches(r, name, fields)]

    def wait_for(
        self, name: str, count: int = 1, timeout_s: float = 20.0, **fields: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [r for r in self.records if _matches(r, name, fields)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [r.get("event") for r in self.records[-20:]]
                    raise AssertionError(
                        f"no {count}x {name} {fields} within {timeout_s}s; last events: {seen}"
                    )
                self._cond.wait(left)


def _matches(record: dict[str, Any], name: str, fields: dict[str, Any]) -> bool:
    return record.get("event") == name and all(record.get(k) == v for k, v in fields.items())


def loguru_events() -> tuple[Events, int]:
    """Attach a sink that feeds an `Events`; returns it and the sink id to remove."""
    events = Events()

    def sink(message: Any) -> None:
        record = message.record
        flat = {"event": record["extra"].get("event"), "level": record["level"].name}
        flat.update(record["extra"])
        events.add(flat)

    return events, logger.add(sink, level="DEBUG")


# Lowers RLIMIT_NOFILE, then becomes `python -m watcher run` (no preexec_fn: tests are threaded).
_WITH_NOFILE = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'watcher', 'run'])"
)


class DaemonProcess:
    """`python -m watcher run` in a subprocess, its JSON log lines parsed into `events`.

    stderr goes into the same stream: every line of both must be one of our JSON events
    (a line that is not is recorded as event ``raw``). `nofile` lowers RLIMIT_NOFILE.
    """

    def __init__(
        self, env: dict[str, str], prefix: tuple[str, ...] = (), nofile: int | None = None
    ) -> None:
        self.env = {**os.environ, **env, "WATCHER_LOG_FORMAT": "json"}
        self.prefix = prefix  # e.g. setpriv ... to run it without privileges
        self.nofile = nofile
        self.events = Events()
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[bytes] = []

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self.events = Events()
        command = [sys.executable, "-m", "watcher", "run"]
        if self.nofile is not None:
            command = [sys.executable, "-c", _WITH_NOFILE, str(self.nofile)]
        self.proc = subprocess.Popen(
            [*self.prefix, *command],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, args=(self.proc, self.events), daemon=True).start()
        if wait_ready:
            self.events.wait_for("watcher.ready", timeout_s=30)
        return self

    def _read(self, proc: subprocess.Popen[bytes], events: Events) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            try:
                events.add(json.loads(line))
            except ValueError:
                events.add({"event": "raw", "line": line.decode("utf-8", "replace")})

    @property
    def http_address(self) -> tuple[str, int]:
        """Where the daemon's HTTP API listens (from its `http.listening` event)."""
        (listening,) = self.events.wait_for("http.listening")
        return listening["host"], listening["port"]

    def raw_lines(self) -> list[str]:
        """Output lines that are not one JSON object each (there must be none)."""
        return [r["line"] for r in self.events.named("raw")]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file below root (hidden ones too), but for the daemon's staging area."""
    found: dict[str, bytes] = {}
    for dirpath, dirs, names in os.walk(root):
        if Path(dirpath) == root and ".watcher" in dirs:
            dirs.remove(".watcher")
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                found[os.path.relpath(path, root)] = path.read_bytes()
    return found


def quarantined(qdir: Path) -> list[dict[str, Any]]:
    """The metadata records in a quarantine directory, each with its file's bytes.

    A record is written just before its file arrives, so `bytes` may briefly be None.
    """
    records = []
    for meta in sorted(qdir.glob("*.json")):
        record = json.loads(meta.read_text())
        data = qdir / record["id"]
        record["bytes"] = data.read_bytes() if data.exists() else None
        records.append(record)
    return records


def staged(uploads: Path) -> list[str]:
    """Claimed files still in staging (none once a daemon has stopped cleanly)."""
    return sorted(p.name for p in claimed_files(uploads / ".watcher"))


def delivered_count(dirs: dict[str, Path]) -> int:
    complete = [r for r in quarantined(dirs["quarantine"]) if r["bytes"] is not None]
    return len(files_under(dirs["processed"])) + len(complete)
