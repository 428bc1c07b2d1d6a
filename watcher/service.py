"""What `watcher run` runs: the daemon, its scheduled jobs and its operations surface, composed.

The core (watcher/daemon.py and below) knows nothing of the jobs (watcher/jobs/) or the
operations surface (watcher/ops/): they are built here, on the daemon's state and listener
hooks. Start and stop order:

- start: take the HTTP port (a taken WATCHER_HTTP_ADDR fails before any file is claimed), the
  notifier's log sink, the daemon (which opens the verdict store), the jobs, then the HTTP
  server, metrics and heartbeat, then the webhook sender;
- stop: drain the daemon (intake stops, in-flight scans finish within the grace time), stop
  the jobs within what is left of it, close the delivery log unless a worker may still write
  it, then the operations surface, the webhook sender and notifier (what is gathered is sent),
  then the daemon's staging directory and verdict store.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from watcher.clamav import Scanner
from watcher.daemon import Daemon, Partition
from watcher.endpoints import EndpointStatus
from watcher.jobs import Jobs
from watcher.ops import Operations
from watcher.pipeline import Result
from watcher.processes import ScanProcesses, auto_count
from watcher.push import Push
from watcher.settings import Settings


class Service:
    def __init__(self, settings: Settings, scanner: Scanner | None = None) -> None:
        self.settings = settings
        count = settings.processes or auto_count(os.cpu_count())
        self.daemon = Daemon(settings, scanner, Partition(0, count))
        self.processes = ScanProcesses(settings, count, self.daemon.publish)
        self.jobs = Jobs(
            settings,
            self.daemon.scanner,
            self.daemon.definitions,
            on_reloaded=self._definitions_reloaded,
            allowlisted=self.daemon.allowlist.contains,
            recorder=self.daemon.recorder,
        )
        self.daemon.add_listener(self.jobs.deliveries.record)
        self.ops = Operations(
            settings,
            AllProcesses(self.daemon, self.processes),
            self.jobs.status,
            self.daemon.recorder,
        )
        self.push = Push(settings, self.daemon.recorder)
        if self.push.notifier is not None:  # every process's results are published here
            self.daemon.add_listener(self.push.notifier.observe_result)
        self._closed = False

    def start(self) -> None:
        self.ops.bind()
        self.push.start_notifier()
        self.daemon.start()
        self.processes.start()
        self.jobs.start()
        self.ops.start()
        self.push.start()

    def _definitions_reloaded(self) -> None:
        self.daemon.definitions_reloaded()
        self.processes.definitions_reloaded()

    def close(self) -> None:
        """Idempotent."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        self.processes.signal_stop()  # they drain while we do
        unfinished = self.daemon.drain()
        left_s = self.settings.shutdown_grace_s - (time.monotonic() - started)
        self.processes.wait(max(1.0, left_s))
        self.jobs.shutdown(max(1.0, left_s))
        if not unfinished:  # a worker still running may yet record a delivery
            self.jobs.deliveries.close()
        self.ops.close()
        self.push.close()
        self.daemon.close()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; exit code 0 after a graceful stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.daemon.stop_event.set())
        self.start()
        try:
            # With a timeout: the kernel may deliver SIGTERM to any thread (the HTTP loop's
            # epoll, say); Python runs the handler only once the main thread wakes, and an
            # untimed wait never does (a daemon that ignored SIGTERM, 1 time in 6 here).
            while not self.daemon.stop_event.wait(0.5):
                pass
        finally:
            self.close()
        return 0


class AllProcesses:
    """The daemon's state with its scan processes' summed in: what the operations surface
    reads (watcher/ops/state.py) when `watcher run` uses more than one process."""

    def __init__(self, daemon: Daemon, processes: ScanProcesses) -> None:
        self._daemon = daemon
        self._processes = processes
        self.definitions = daemon.definitions

    @property
    def in_flight(self) -> int:
        return self._daemon.in_flight + self._processes.in_flight()

    def alive(self) -> bool:
        return self._daemon.alive() and self._processes.alive()

    def intake_alive(self) -> bool:
        return self._daemon.intake_alive()

    def queue_depth(self) -> int:
        return self._daemon.queue_depth() + self._processes.queue_depth()

    def probe_clamd(self, timeout_s: float) -> str | None:
        return self._daemon.probe_clamd(timeout_s)

    def clamd_distrust(self) -> str | None:
        return self._daemon.clamd_distrust() or self._processes.clamd_distrust()

    def clamd_endpoints(self) -> list[EndpointStatus]:
        return self._daemon.clamd_endpoints()

    def failing_destinations(self) -> dict[str, str]:
        return {**self._processes.failing_destinations(), **self._daemon.failing_destinations()}

    def uploads(self) -> Iterator[tuple[Path, os.stat_result]]:
        return self._daemon.uploads()

    def add_listener(self, listener: Callable[[Result], None]) -> None:
        self._daemon.add_listener(listener)  # the scan processes' results are published there

    def on_trust_change(self, listener: Callable[[], None]) -> None:
        self._daemon.on_trust_change(listener)
