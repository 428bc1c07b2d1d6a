"""Fixtures: one real clamd for the session, fresh directories and an in-process daemon per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from support import Clamd, Events, loguru_events

from watcher.service import Service
from watcher.settings import Settings

if shutil.which("clamd") is None:
    pytest.exit("clamd is not installed: run the suite with `make test`", returncode=3)


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """The shared clamd. Tests that stop or freeze clamd use `own_clamd` instead."""
    server = Clamd(tmp_path_factory.mktemp("clamd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_clamd(tmp_path: Path) -> Iterator[Clamd]:
    server = Clamd(tmp_path / "clamd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("uploads", "processed", "quarantine", "state")}
    paths["uploads"].mkdir()
    return paths


@pytest.fixture
def events() -> Iterator[Events]:
    recorded, sink_id = loguru_events()
    yield recorded
    logger.remove(sink_id)


@pytest.fixture
def make_settings(dirs: dict[str, Path], clamd_server: Clamd) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "uploads_dir": dirs["uploads"],
            "processed_dir": dirs["processed"],
            "quarantine_dir": dirs["quarantine"],
            "state_dir": dirs["state"],
            "clamav_socket": clamd_server.socket,
            "settle_s": 0.3,
            "sweep_interval_s": 30,
            "shutdown_grace_s": 10,
            "update_command": "",  # never freshclam against the real mirrors from a test
            "definitions_dir": clamd_server.db,
            "http_addr": "127.0.0.1:0",  # never a fixed port: test runs share the machine
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_daemon(
    make_settings: Callable[..., Settings], events: Events
) -> Iterator[Callable[..., Service]]:
    """Start the daemon in-process with its jobs and HTTP surface, as `watcher run` composes
    them (watcher/service.py), without signal handlers; closed at the end of the test."""
    started: list[Service] = []

    def start(**overrides: Any) -> Service:
        service = Service(make_settings(**overrides))
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


@pytest.fixture
def subprocess_env(dirs: dict[str, Path], clamd_server: Clamd) -> dict[str, str]:
    return {
        "WATCHER_UPLOADS_DIR": str(dirs["uploads"]),
        "WATCHER_PROCESSED_DIR": str(dirs["processed"]),
        "WATCHER_QUARANTINE_DIR": str(dirs["quarantine"]),
        "WATCHER_STATE_DIR": str(dirs["state"]),
        "CLAMAV_SOCKET": str(clamd_server.socket),
        "WATCHER_SETTLE_S": "0.3",
        "WATCHER_UPDATE_COMMAND": "",
        "WATCHER_DEFINITIONS_DIR": str(clamd_server.db),
        "WATCHER_HTTP_ADDR": "127.0.0.1:0",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
