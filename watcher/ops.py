"""The operations surface, assembled: verdicts, metrics, heartbeat and the HTTP server.

Owned by the daemon (`Daemon.ops`), started after the workers and closed after they drained.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from loguru import logger

from watcher.api import ApiServer
from watcher.errors import ConfigError
from watcher.health import Heartbeat, liveness, probe_clamd, readiness
from watcher.healthcheck import HEARTBEAT_FILE
from watcher.metrics import Metrics
from watcher.verdicts import FileStatus, Verdicts

if TYPE_CHECKING:
    from watcher.daemon import Daemon


class Operations:
    def __init__(self, daemon: Daemon) -> None:
        s = daemon.settings
        self.daemon = daemon
        self.max_wait_s = s.http_max_wait_s
        self.verdicts = Verdicts(
            s.uploads_dir, s.processed_dir, s.staging_root, capacity=s.verdict_memory
        )
        self.metrics = Metrics(daemon, lambda: probe_clamd(daemon))
        clamd = os.path.abspath(s.clamav_socket) if s.clamav_socket else None
        clamd = clamd or f"{s.clamav_host}:{s.clamav_port}"
        self.heartbeat = Heartbeat(
            s.state_dir / HEARTBEAT_FILE, s.heartbeat_interval_s, daemon.alive,
            problems=self.problems,
            clamd=clamd if s.scanning_enabled else None, probe_timeout_s=s.probe_timeout_s,
        )  # fmt: skip
        daemon.clamd_check.listeners.append(self._beat_now)
        self.server: ApiServer | None = None
        daemon.add_listener(self.metrics.observe)  # first: a verdict seen is already counted
        daemon.add_listener(self.verdicts.record)

    def bind(self) -> None:
        """Take the HTTP port (before the daemon takes any file: a taken port fails the start)."""
        bind = self.daemon.settings.http_bind
        if bind is not None and self.server is None:
            try:
                self.server = ApiServer(bind[0], bind[1], self)
            except OSError as err:
                addr = self.daemon.settings.http_addr
                raise ConfigError(f"WATCHER_HTTP_ADDR: cannot listen on {addr}: {err}") from err

    def start(self) -> None:
        self.bind()
        self.metrics.start()
        self.heartbeat.start()
        if self.server is not None:
            self.server.start()
            host, port = self.server.address
            logger.bind(event="http.listening", host=host, port=port).info("HTTP ready")

    def close(self) -> None:
        self.heartbeat.stop()
        self.verdicts.close()
        if self.server is not None:
            self.server.close()
        self.metrics.stop()

    def problems(self) -> dict[str, str]:
        """What makes the daemon unhealthy though its loops run (for `watcher healthcheck`)."""
        found = dict(self.daemon.destinations.failing())
        if self.daemon.clamd_check.problem:
            found["clamd canaries"] = self.daemon.clamd_check.problem
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
        return readiness(self.daemon)

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def file_status(self, rel: str, wait_s: float) -> FileStatus:
        if wait_s > 0:
            return self.verdicts.wait(rel, wait_s)
        return self.verdicts.lookup(rel)
