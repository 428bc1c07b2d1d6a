"""The heartbeat file: written by the daemon (`Heartbeat`), read by `watcher healthcheck`.

``<state_dir>/heartbeat.json`` is rewritten every `heartbeat_interval_s` while the daemon's
loops are alive; it names the daemon's pid, the clamd it uses, and what makes it unhealthy
though its loops run (`problems`: a destination refusing deliveries, clamd failing its
canaries). `check` (Docker's HEALTHCHECK, through `watcher healthcheck`) reads it: the pid is
alive, the heartbeat fresh, no problem named, and clamd answers a PING with a short timeout.
Standard library only and no settings model, well under a second: the state directory comes
from WATCHER_STATE_DIR, else ``state_dir`` in the WATCHER_CONFIG file, else the default. Exit
0 healthy, 1 not, with one line saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher import clamd_socket
from watcher.clamd_socket import parse_address
from watcher.fsops import write_json_atomic

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_MISSES = 3  # a heartbeat older than this many intervals: the daemon is stuck
DEFAULT_STATE_DIR = "/var/lib/watcher"  # Settings.state_dir's default (a test keeps them equal)


def main() -> int:
    ok, line = check(state_dir())
    print(line, flush=True)
    return 0 if ok else 1


def state_dir() -> Path:
    if os.environ.get("WATCHER_STATE_DIR"):
        return Path(os.environ["WATCHER_STATE_DIR"])
    config = os.environ.get("WATCHER_CONFIG")
    if config:
        try:
            with open(config, "rb") as f:
                return Path(tomllib.load(f).get("state_dir", DEFAULT_STATE_DIR))
        except (OSError, tomllib.TOMLDecodeError):
            pass  # then the heartbeat is looked for in the default place, and reported missing
    return Path(DEFAULT_STATE_DIR)


def check(state: Path, now: float | None = None) -> tuple[bool, str]:
    path = state / HEARTBEAT_FILE
    try:
        beat: dict[str, Any] = json.loads(path.read_bytes())
        age_s = (time.time() if now is None else now) - path.stat().st_mtime
        pid = int(beat["pid"])
        interval_s = float(beat["interval_s"])
    except FileNotFoundError:
        return False, f"daemon not running: no heartbeat at {path}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return False, f"daemon state unreadable: {path}: {err!r}"
    if not pid_alive(pid):
        return False, f"daemon not running: pid {pid} is gone (stale {path})"
    limit_s = HEARTBEAT_MISSES * interval_s + 1
    if age_s > limit_s:
        return False, f"daemon stuck: last heartbeat {age_s:.0f}s ago (limit {limit_s:.0f}s)"
    problems = beat.get("problems")
    if isinstance(problems, dict) and problems:
        listed = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))
        return False, f"daemon pid {pid} alive but unhealthy: {listed}"
    clamd = beat.get("clamd")
    if not clamd:
        return True, f"ok: daemon pid {pid} alive; scanning disabled, clamd not checked"
    timeout_s = float(beat.get("probe_timeout_s", 0.5))
    problem: str | None = "no clamd address"
    for address in str(clamd).split(","):  # a pool: any endpoint answering will do
        problem = clamd_socket.ping(parse_address(address), timeout_s)
        if problem is None:
            return True, f"ok: daemon pid {pid} alive, clamd answered PING"
    return False, f"clamd not answering PING at {clamd}: {problem}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


class Heartbeat:
    """Touches `path` every `interval_s` while `alive()`; removed at a graceful stop."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        alive: Callable[[], bool],
        problems: Callable[[], dict[str, str]] = dict,
        **info: Any,
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self._alive = alive
        self._problems = problems  # what makes the daemon unhealthy though its loops run
        self._info = info  # what `watcher healthcheck` needs: the clamd address, the timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="watcher-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def beat(self) -> None:
        body = {
            "pid": os.getpid(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "interval_s": self.interval_s,
            "problems": self._problems(),
            **self._info,
        }
        write_json_atomic(self.path, json.dumps(body).encode(), mode=0o644)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._alive():
                # A full state disk: the heartbeat goes stale and healthcheck says so.
                with contextlib.suppress(OSError):
                    self.beat()
