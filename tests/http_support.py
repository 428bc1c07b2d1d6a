"""Real HTTP requests to a daemon's API, with the raw path sent as given (no normalising)."""

from __future__ import annotations

import http.client
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import run_cli

from watcher.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


def address(daemon: Daemon) -> tuple[str, int]:
    assert daemon.ops.server is not None, "the daemon has no HTTP server"
    return daemon.ops.server.address


def get(target: Daemon | tuple[str, int], path: str, timeout_s: float = 10.0) -> Response:
    host, port = address(target) if isinstance(target, Daemon) else target
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), resp.getheader("Content-Type") or "")
    finally:
        conn.close()


def watcher_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m watcher ARGS` with the given environment added."""
    return run_cli(*args, env=env, timeout_s=30)
