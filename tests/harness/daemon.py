"""watcher as a subprocess: `watcher run` with its JSON log lines parsed as they come, and one-shot
commands (`scan`, `healthcheck`, ...). Always `python -m watcher` from a source tree (this
checkout unless PYTHONPATH names another), so what runs is the code under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from harness import ROOT
from harness.clamd import Clamd
from harness.events import Events, record_of

# Lowers RLIMIT_NOFILE, then becomes `python -m watcher run` (no preexec_fn: tests are threaded).
_WITH_NOFILE = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'watcher', 'run'])"
)


def daemon_env(dirs: Mapping[str, Path], clamd: Clamd, **settings: str) -> dict[str, str]:
    """The environment naming a daemon's four directories (``dirs``: uploads, processed,
    quarantine, state) and its clamd, the code from this checkout; `settings` are added
    (``WATCHER_...``, or ``PYTHONPATH`` for another source tree)."""
    return {
        "WATCHER_UPLOADS_DIR": str(dirs["uploads"]),
        "WATCHER_PROCESSED_DIR": str(dirs["processed"]),
        "WATCHER_QUARANTINE_DIR": str(dirs["quarantine"]),
        "WATCHER_STATE_DIR": str(dirs["state"]),
        "CLAMAV_SOCKET": str(clamd.socket),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **settings,
    }


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


def run_cli_json(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`run_cli` with the log as JSON lines on stdout (`json_records` reads them)."""
    return run_cli(*args, env={**env, "WATCHER_LOG_FORMAT": "json"})


def json_records(output: str) -> dict[str, dict[str, Any]]:
    """The JSON log lines in a command's output, by event name (the last one of each)."""
    found = {}
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[record["event"]] = record
    return found


class DaemonProcess:
    """`python -m watcher run` in a subprocess, its JSON log lines parsed into `events`.

    stderr goes into the same stream: every line of both must be one of our JSON events
    (a line that is not is recorded as event ``raw``). `env` is added to this process's
    environment, with ``WATCHER_LOG_FORMAT=json``. Options:

    - `prefix`: a command the daemon runs under (e.g. setpriv ..., to run it unprivileged);
    - `nofile`: RLIMIT_NOFILE for it;
    - `keep`: which records `events` keeps (default all, and then every line in `lines`);
      each record is counted by name either way (`events.count`, `events.wait_count`);
    - `on_record`: called with each record, in the reading thread;
    - `log_file`: every line copied there as it comes;
    - `cwd`: where it runs (``python -m`` looks there first).
    """

    def __init__(
        self,
        env: dict[str, str],
        prefix: tuple[str, ...] = (),
        nofile: int | None = None,
        *,
        keep: Callable[[dict[str, Any]], bool] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        log_file: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.env = {**os.environ, **env, "WATCHER_LOG_FORMAT": "json"}
        self.prefix = prefix
        self.nofile = nofile
        self.keep, self.on_record, self.log_file, self.cwd = keep, on_record, log_file, cwd
        self.events = Events(keep)
        self.ready = threading.Event()  # its `watcher.ready` line was read
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[bytes] = []

    def start(self, wait_ready: bool = True, timeout_s: float = 30) -> DaemonProcess:
        self.events = Events(self.keep)
        self.ready = threading.Event()
        command = [sys.executable, "-m", "watcher", "run"]
        if self.nofile is not None:
            command = [sys.executable, "-c", _WITH_NOFILE, str(self.nofile)]
        self.proc = subprocess.Popen(
            [*self.prefix, *command],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, args=(self.proc, self.events), daemon=True).start()
        if wait_ready and not self.ready.wait(timeout_s):
            seen = [r.get("event") for r in self.events.records[-20:]]
            raise AssertionError(f"no watcher.ready within {timeout_s}s; last events: {seen}")
        return self

    def _read(self, proc: subprocess.Popen[bytes], events: Events) -> None:
        assert proc.stdout is not None
        copy: IO[bytes] | None = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            for line in proc.stdout:
                if copy is not None:
                    copy.write(line)
                self._parse(line, events)
        finally:
            if copy is not None:
                copy.close()

    def _parse(self, line: bytes, events: Events) -> None:
        record = record_of(line)
        if self.keep is None:
            self.lines.append(line)
        if record.get("event") == "watcher.ready":
            self.ready.set()
        events.add(record)
        if self.on_record is not None:
            self.on_record(record)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM, and its exit code; subprocess.TimeoutExpired if it is not gone in time."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=timeout_s)
