"""What the benches share, and their way to the test harness.

Importing this module puts tests/ on sys.path: it is the one place that does, so every bench
(bench.py, http_bench.py, the soak) starts clamd and `watcher run` with the very code the tests
use (tests/harness). The harness is test code, so it is neither installed nor in the image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from harness.clamd import Clamd  # noqa: E402 (needs the line above)
from harness.daemon import DaemonProcess, daemon_env  # noqa: E402

# What a bench counts as one file settled, told by the daemon's own log: polling processed
# (tens of thousands of entries) would take CPU from the daemon being measured.
DELIVERED = ("file.clean", "file.infected", "file.unscannable")


def bench_clamd(root: Path, max_queue: int = 200) -> Clamd:
    """The benches' clamd, started: 4 threads, DisableCache yes (or clamd's cache of clean
    results would be measured), and AlertEncrypted yes: with WATCHER_ARCHIVE_INSPECTION=false
    (the archive A/B's "off" arm) clamd must flag the encrypted canary itself, or the daemon
    holds every file."""
    return Clamd(root, alert_encrypted=True, disable_cache=True, max_queue=max_queue).start()


def _file_event(record: dict[str, Any]) -> bool:
    """What the benches keep: every file's outcome, and each (scan) process's ready line."""
    event = str(record.get("event", ""))
    return event.startswith("file.") or event == "watcher.ready"


class Watcher(DaemonProcess):
    """`watcher run` as a subprocess on directories under `base`, started and ready; its
    ``file.*`` records kept for latency figures, its deliveries counted from its log."""

    def __init__(
        self,
        base: Path,
        clamd: Clamd,
        state: str = "state",
        **env: str,
    ) -> None:
        self.uploads, self.processed = base / "uploads", base / "processed"
        self.quarantine = base / "quarantine"
        self.uploads.mkdir(parents=True, exist_ok=True)
        dirs = {"uploads": self.uploads, "processed": self.processed}
        dirs |= {"quarantine": self.quarantine, "state": base / state}
        settings = {"WATCHER_LOG_LEVEL": "INFO", "WATCHER_HTTP_ADDR": "127.0.0.1:0", **env}
        # cwd: `python -m` looks in the working directory before PYTHONPATH, so a bench run
        # from a checkout would run that checkout's code whatever PYTHONPATH names.
        super().__init__(daemon_env(dirs, clamd, **settings), keep=_file_event, cwd=base)
        self.start(timeout_s=60)

    @property
    def log(self) -> list[dict[str, Any]]:
        """The ``file.*`` records so far, in order."""
        return self.events.records

    @property
    def delivered(self) -> int:
        return self.events.count(*DELIVERED)

    def wait_delivered(self, expected: int, timeout_s: float) -> float:
        """Until `expected` files are settled; returns the time (monotonic) they were."""
        self.events.wait_count(DELIVERED, expected, timeout_s)
        return time.monotonic()

    def stop(self) -> None:
        self.terminate(timeout_s=60)


def export(rev: str, into: Path) -> Path:
    """`rev` of this repository, as files (no worktree: nothing to clean up in git)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    archive.check_returncode()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def move_all(source: Path, target: Path) -> float:
    """Rename every file of source into target (same filesystem); returns the start time."""
    names = sorted(os.listdir(source))
    started = time.monotonic()
    for name in names:
        os.rename(source / name, target / name)
    return started


def small_files(directory: Path, count: int, start: int) -> None:
    directory.mkdir(exist_ok=True)
    for n in range(start, start + count):
        (directory / f"s{n:06}.txt").write_bytes(b"small file %d\n" % n)
