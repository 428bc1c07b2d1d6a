"""Liveness, readiness and `watcher healthcheck` against a running daemon and a real clamd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ROOT
from harness.clamd import Clamd
from harness.daemon import DaemonProcess, run_cli
from harness.events import Events
from harness.http_client import get
from watcher.heartbeat import DEFAULT_STATE_DIR, state_dir
from watcher.service import Service
from watcher.settings import Settings

Start = Callable[..., Service]


def healthcheck(dirs: dict[str, Path]) -> tuple[int, str, float]:
    started = time.monotonic()
    result = run_cli("healthcheck", env={"WATCHER_STATE_DIR": str(dirs["state"])})
    return result.returncode, result.stdout, time.monotonic() - started


def test_ready_daemon_answers_200_everywhere_and_healthcheck_exits_0(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    assert get(daemon, "/healthz").status == 200
    ready = get(daemon, "/readyz")
    assert ready.status == 200 and ready.content_type == "application/json"
    assert ready.json()["ready"] is True and ready.json()["failing"] == []
    assert set(ready.json()["checks"]) >= {"clamd", "definitions", "uploads_dir", "processed_dir"}
    code, line, elapsed = healthcheck(dirs)
    assert code == 0 and line.startswith("ok:"), line
    assert elapsed < 3  # the short path: no daemon, pydantic or clamd client imported


def test_clamd_stopped_fails_readiness_and_healthcheck_then_both_recover(
    make_settings: Callable[..., Settings], own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    daemon = Service(make_settings(clamav_socket=own_clamd.socket))
    daemon.start()
    try:
        own_clamd.stop()
        stopped = time.monotonic()
        ready = get(daemon, "/readyz")
        assert ready.status == 503
        assert ready.json()["failing"] == ["clamd"]
        assert ready.json()["checks"]["uploads_dir"] == "ok"
        code, line, _ = healthcheck(dirs)
        assert code == 1 and "clamd" in line, line
        assert time.monotonic() - stopped < 10
        assert get(daemon, "/healthz").status == 200  # alive, only not ready
        events.wait_for("clamd.down")  # the probe told the daemon: workers pause

        own_clamd.start()
        events.wait_for("clamd.up", timeout_s=10)
        assert get(daemon, "/readyz").status == 200
        code, line, _ = healthcheck(dirs)
        assert code == 0, line
    finally:
        daemon.close()


def test_stale_definitions_fail_readiness(start_daemon: Start) -> None:
    daemon = start_daemon()
    daemon.daemon.definitions.set_stale(True)  # what the staleness job does
    ready = get(daemon, "/readyz")
    assert ready.status == 503 and ready.json()["failing"] == ["definitions"]
    daemon.daemon.definitions.set_stale(False)
    assert get(daemon, "/readyz").status == 200


def test_missing_processed_directory_fails_readiness(
    start_daemon: Start, dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    dirs["processed"].rmdir()
    ready = get(daemon, "/readyz")
    assert ready.status == 503 and ready.json()["failing"] == ["processed_dir"]


def test_healthcheck_without_a_daemon_exits_1_saying_so(dirs: dict[str, Path]) -> None:
    code, line, _ = healthcheck(dirs)
    assert code == 1 and line.startswith("daemon not running"), line


def test_healthcheck_after_a_graceful_stop_exits_1(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    daemon = DaemonProcess(subprocess_env).start()
    daemon.events.wait_for("http.listening")
    assert healthcheck(dirs)[0] == 0
    assert daemon.terminate() == 0
    code, line, _ = healthcheck(dirs)
    assert code == 1 and "not running" in line, line


def test_healthcheck_after_sigkill_exits_1_naming_the_dead_pid(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    daemon = DaemonProcess(subprocess_env).start()
    assert healthcheck(dirs)[0] == 0
    daemon.kill()
    code, line, _ = healthcheck(dirs)
    assert code == 1 and "is gone" in line, line


def test_healthcheck_default_state_dir_matches_the_settings() -> None:
    assert Path(DEFAULT_STATE_DIR) == Settings.model_fields["state_dir"].default


def test_unknown_route_is_404_json(start_daemon: Start) -> None:
    response = get(start_daemon(), "/nope")
    assert response.status == 404 and response.json() == {"error": "not found"}


def test_healthcheck_loads_only_the_standard_library(dirs: dict[str, Path]) -> None:
    probe = (
        "import sys; from watcher.cli import main; main(['healthcheck']); "
        "heavy = ('pydantic', 'clamd', 'watchdog', 'loguru', 'prometheus_client', "
        "'watcher.daemon', 'watcher.settings'); print([m for m in heavy if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WATCHER_STATE_DIR": str(dirs["state"])},
    )  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_http_address_in_use_fails_the_start_with_exit_2(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess({**subprocess_env, "WATCHER_HTTP_ADDR": f"127.0.0.1:{port}"})
        daemon.start(wait_ready=False)
        assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 2
    output = b"".join(daemon.lines).decode()
    assert "WATCHER_HTTP_ADDR" in output and "watcher.ready" not in output
    assert not dirs["processed"].exists()  # it failed before setting anything up


def test_healthcheck_finds_the_state_dir_in_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "watcher.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    monkeypatch.delenv("WATCHER_STATE_DIR", raising=False)
    monkeypatch.setenv("WATCHER_CONFIG", str(config))
    assert state_dir() == tmp_path / "state"
    monkeypatch.setenv("WATCHER_STATE_DIR", str(tmp_path / "env"))
    assert state_dir() == tmp_path / "env"  # the environment wins, as for every setting
