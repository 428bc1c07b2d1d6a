"""Fixtures: real clamds, fresh directories and an in-process daemon per test.

Only the tests that ask for a clamd (`clamd_server`, `make_clamd`, or a fixture built on them:
`own_clamd`, `make_settings`, `start_daemon`, `subprocess_env`) need one: they are marked
`clamd` here, so `pytest -m "not clamd"` runs the rest on a machine without it, where a clamd
test is skipped saying why. `make test` passes `--require-clamd`: there a missing clamd fails
the run, so no clamd test can be skipped by accident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from harness.clamd import Clamd, clamd_binary
from harness.daemon import daemon_env
from harness.events import Events, loguru_events
from harness.mirror import SignatureServer
from harness.postgres import Postgres
from harness.postgres import available as postgres_available
from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.service import Service
from watcher.settings import Settings
from watcher.store import STORE_FILE, VerdictStore
from watcher.store.postgres import PostgresStore
from watcher.store.sqlite import SqliteStore

# Every clamd a test gets comes from one of these two.
CLAMD_FIXTURES = frozenset({"clamd_server", "make_clamd"})
NO_CLAMD = "clamd is not installed (`make install`); deselect these tests with -m 'not clamd'"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-clamd",
        action="store_true",
        help="a missing clamd fails the run instead of skipping the tests that need it",
    )
    parser.addoption(
        "--hosts",
        action="store_true",
        help="also run the replicas-on-simulated-hosts tests (root, minutes: make replicas-test)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-clamd") and clamd_binary() is None:
        raise pytest.UsageError("--require-clamd, but clamd is not installed: run `make install`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--hosts"):  # tests/test_hosts.py: `make replicas-test` runs them
        hosts = [item for item in items if item.get_closest_marker("hosts") is not None]
        if hosts:
            config.hook.pytest_deselected(items=hosts)
            items[:] = [item for item in items if item.get_closest_marker("hosts") is None]
    missing = clamd_binary() is None
    for item in items:
        if CLAMD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.clamd)
        if missing and item.get_closest_marker("clamd") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CLAMD))


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """The shared clamd. Tests that stop, freeze or reconfigure clamd use `make_clamd`."""
    server = Clamd(tmp_path_factory.mktemp("clamd")).start()
    yield server
    server.stop()


@pytest.fixture
def make_clamd(tmp_path: Path) -> Iterator[Callable[..., Clamd]]:
    """A clamd of the test's own, started (Clamd's options); stopped at the end of the test."""
    started: list[Clamd] = []

    def make(name: str = "clamd", **options: Any) -> Clamd:
        server = Clamd(tmp_path / name, **options)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def own_clamd(make_clamd: Callable[..., Clamd]) -> Clamd:
    return make_clamd()


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


def _settings(dirs: dict[str, Path], socket: Path, definitions: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "uploads_dir": dirs["uploads"],
            "processed_dir": dirs["processed"],
            "quarantine_dir": dirs["quarantine"],
            "state_dir": dirs["state"],
            "clamav_socket": socket,
            "settle_s": 0.3,
            "sweep_interval_s": 30,
            "staging_lease_s": 2,  # a killed daemon's claims adopted within ~3 s, not 40
            "shutdown_grace_s": 10,
            "update_command": "",  # never freshclam against the real mirrors from a test
            "definitions_dir": definitions,
            "http_addr": "127.0.0.1:0",  # never a fixed port: test runs share the machine
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_settings(dirs: dict[str, Path], clamd_server: Clamd) -> Callable[..., Settings]:
    """Settings for the test's directories and the shared clamd; keywords override."""
    return _settings(dirs, clamd_server.socket, clamd_server.db)


@pytest.fixture
def make_offline_settings(dirs: dict[str, Path], tmp_path: Path) -> Callable[..., Settings]:
    """As `make_settings`, for a test that fakes the scanner: no clamd listens on the socket,
    and the definitions directory is empty."""
    (tmp_path / "definitions").mkdir()
    return _settings(dirs, tmp_path / "no-clamd.sock", tmp_path / "definitions")


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
    """The environment for `watcher` as a subprocess (DaemonProcess, run_cli) on the test's
    directories and the shared clamd."""
    return daemon_env(
        dirs,
        clamd_server,
        WATCHER_SETTLE_S="0.3",
        WATCHER_STAGING_LEASE_S="2",
        WATCHER_UPDATE_COMMAND="",
        WATCHER_DEFINITIONS_DIR=str(clamd_server.db),
        WATCHER_HTTP_ADDR="127.0.0.1:0",
    )


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[SignatureServer]:
    """A signature mirror on 127.0.0.1 for freshclam (harness.mirror)."""
    server = SignatureServer(tmp_path / "mirror").start()
    yield server
    server.stop()


@pytest.fixture
def jobs_for(events: Events) -> Iterator[Callable[[Settings], Jobs]]:
    """Jobs on their own (no intake), scheduler started; shut down at the end of the test."""
    started: list[Jobs] = []

    def make(settings: Settings) -> Jobs:
        jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
        jobs.start()
        started.append(jobs)
        return jobs

    yield make
    for jobs in started:
        jobs.shutdown(10)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[Postgres]:
    """One real PostgreSQL for the session (harness.postgres); tests that stop it start it
    again. Missing under `make test` (--require-clamd: a full run) fails the run."""
    missing = postgres_available()
    if missing is not None:
        if request.config.getoption("--require-clamd"):
            pytest.fail(missing)
        pytest.skip(missing)
    server = Postgres().init().start()
    yield server
    server.destroy()


@pytest.fixture
def database_url(postgres_server: Postgres) -> str:
    """A database of the test's own on the session's server (a password in the URL)."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for a daemon on each verdict store: none (SQLite in its state
    directory), or a database of the test's own."""
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("database_url")}


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., VerdictStore]]:
    """The verdict store's contract, run against each backend: `make_store()` opens a store
    (again on the same data when called again); all are closed at the end of the test."""
    opened: list[VerdictStore] = []
    url = request.getfixturevalue("database_url") if request.param == "postgresql" else ""

    def make(mixin: type[Any] | None = None) -> VerdictStore:
        """`mixin`: a class whose methods go before the backend's (one seam faked)."""
        base: type[Any] = PostgresStore if request.param == "postgresql" else SqliteStore
        cls = base if mixin is None else type("Store", (mixin, base), {})
        arg = url if request.param == "postgresql" else tmp_path / STORE_FILE
        store: VerdictStore = cls(arg, 5.0) if request.param == "postgresql" else cls(arg)
        store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def hosts_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Staging objects of a test stand for daemons on different hosts: none knows its
    host, so none may trust a free flock at once (tests/test_leases.py has the same-host case)."""
    monkeypatch.setattr("watcher.claims.host_identity", lambda: None)
