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

import signal
import time

from watcher.clamav import Scanner
from watcher.daemon import Daemon
from watcher.jobs import Jobs
from watcher.ops import Operations
from watcher.push import Push
from watcher.settings import Settings


class Service:
    def __init__(self, settings: Settings, scanner: Scanner | None = None) -> None:
        self.settings = settings
        self.daemon = Daemon(settings, scanner)
        self.jobs = Jobs(
            settings,
            self.daemon.scanner,
            self.daemon.definitions,
            on_reloaded=self.daemon.definitions_reloaded,
            allowlisted=self.daemon.allowlist.contains,
            recorder=self.daemon.recorder,
        )
        self.daemon.add_listener(self.jobs.deliveries.record)
        self.ops = Operations(settings, self.daemon, self.jobs.status, self.daemon.recorder)
        self.push = Push(settings, self.daemon.recorder)
        self._closed = False

    def start(self) -> None:
        self.ops.bind()
        self.push.start_notifier()
        self.daemon.start()
        self.jobs.start()
        self.ops.start()
        self.push.start()

    def close(self) -> None:
        """Idempotent."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        unfinished = self.daemon.drain()
        left_s = self.settings.shutdown_grace_s - (time.monotonic() - started)
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
            self.daemon.stop_event.wait()
        finally:
            self.close()
        return 0
