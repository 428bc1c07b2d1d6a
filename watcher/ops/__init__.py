"""The operations surface: HTTP (health, readiness, metrics, verdict lookup) and the heartbeat.

Built by watcher/service.py on the daemon's state (watcher/ops/state.py), started after the
daemon's workers, closed after they drained.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from watcher.endpoints import parse_hosts, shown
from watcher.errors import ConfigError
from watcher.heartbeat import HEARTBEAT_FILE, Heartbeat
from watcher.logs import emit
from watcher.ops.health import liveness, readiness
from watcher.ops.metrics import Metrics
from watcher.ops.server import HttpServer, Limits
from watcher.ops.state import DaemonState, JobRuns
from watcher.ops.verdicts import FileStatus, Verdicts
from watcher.recording import Recorder
from watcher.settings import Settings


class Operations:
    def __init__(
        self,
        settings: Settings,
        daemon: DaemonState,
        job_runs: JobRuns,
        recorder: Recorder | None = None,
    ) -> None:
        s = self.settings = settings
        self.daemon = daemon
        self.max_wait_s = s.http_max_wait_s
        store = recorder.store if recorder is not None else None
        self.verdicts = Verdicts(
            s.uploads_dir, s.processed_dir, s.staging_root, capacity=s.verdict_memory, store=store
        )
        if recorder is not None:
            recorder.listeners.append(self.verdicts.recorded)
        self.metrics = Metrics(settings, daemon, job_runs, store)
        clamd = os.path.abspath(s.clamav_socket) if s.clamav_socket else None
        clamd = clamd or ",".join(shown(e) for e in parse_hosts(s.clamav_host, s.clamav_port))
        self.heartbeat = Heartbeat(
            s.state_dir / HEARTBEAT_FILE,
            s.heartbeat_interval_s,
            daemon.alive,
            problems=self.problems,
            clamd=clamd if s.scanning_enabled else None,
            probe_timeout_s=s.probe_timeout_s,
        )
        daemon.on_trust_change(self._beat_now)
        self.server: HttpServer | None = None
        daemon.add_listener(self.metrics.observe)  # first: a verdict seen is already counted
        daemon.add_listener(self.verdicts.record)

    def bind(self) -> None:
        """Take the HTTP port (before the daemon takes any file: a taken port fails the start)."""
        s = self.settings
        bind = s.http_bind
        limits = Limits(s.http_max_connections, s.http_max_waiters, s.http_header_timeout_s)
        if bind is not None and self.server is None:
            try:
                self.server = HttpServer(bind[0], bind[1], self, limits)
            except OSError as err:
                addr = s.http_addr
                raise ConfigError(f"WATCHER_HTTP_ADDR: cannot listen on {addr}: {err}") from err

    def start(self) -> None:
        self.bind()
        self.metrics.start()
        self.heartbeat.start()
        if self.server is not None:
            self.server.start()  # after the workers: it leaves them half the free descriptors
            host, port = self.server.address
            limits = self.server.limits
            emit(
                "http.listening",
                host=host,
                port=port,
                max_connections=limits.max_connections,
                max_waiters=limits.max_waiters,
                header_timeout_s=limits.header_timeout_s,
            )

    def close(self) -> None:
        self.heartbeat.stop()
        if self.server is not None:
            self.server.close()
        self.metrics.stop()

    def problems(self) -> dict[str, str]:
        """What makes the daemon unhealthy though its loops run (for `watcher healthcheck`)."""
        found = self.daemon.failing_destinations()
        distrust = self.daemon.clamd_distrust()
        if distrust:
            found["clamd canaries"] = distrust
        return found

    def _beat_now(self) -> None:
        """clamd's trust changed: `watcher healthcheck` should know before the next beat."""
        if self.heartbeat.path.parent.is_dir():
            with contextlib.suppress(OSError):
                self.heartbeat.beat()

    # -- api.Backend --------------------------------------------------------------------

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        return liveness(self.daemon)

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        return readiness(self.daemon, self.settings, self.verdicts.store)

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def file_status(self, rel: str) -> FileStatus:
        return self.verdicts.lookup(rel)

    def watch(self, rel: str, wake: Callable[[], None]) -> Callable[[], None]:
        return self.verdicts.watch(rel, wake)

    def by_content(self, sha256: str) -> dict[str, Any]:
        return self.verdicts.by_content(sha256)
