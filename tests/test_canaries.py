"""clamd is checked, not trusted: a clamd that answers a canary wrongly holds every file back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from archive_cases import INFECTED, nest
from harness.clamd import Clamd
from harness.daemon import run_cli
from harness.events import Events, wait_until
from harness.files import files_under
from harness.http_client import get
from watcher.service import Service
from watcher.settings import Settings
from watcher.verdict import Clean, NotScanned

MakeSettings = Callable[..., Settings]


@pytest.fixture
def stock_clamd(make_clamd: Callable[..., Clamd]) -> Clamd:
    """clamd as the official image ships it: no AlertExceedsMax."""
    return make_clamd("stock-clamd", alert_exceeds_max=False)


def healthcheck(dirs: dict[str, Path]) -> tuple[int, str]:
    result = run_cli("healthcheck", env={"WATCHER_STATE_DIR": str(dirs["state"])})
    return result.returncode, result.stdout


def test_a_clamd_without_alert_exceeds_max_holds_files_until_it_is_fixed(
    make_settings: MakeSettings, stock_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    daemon = Service(make_settings(clamav_socket=stock_clamd.socket))
    daemon.start()
    try:
        (untrusted,) = events.wait_for("clamd.untrusted")
        assert untrusted["level"] == "ERROR" and "canary nest" in untrusted["problem"]
        ready = get(daemon, "/readyz")
        assert ready.status == 503 and ready.json()["failing"] == ["clamd_canaries"]
        code, line = healthcheck(dirs)
        assert code == 1 and "canary nest" in line, line
        metrics = get(daemon, "/metrics").body.decode()
        assert "watcher_clamd_trusted 0.0" in metrics

        (dirs["uploads"] / "report.txt").write_bytes(b"waits for a clamd we can trust\n")
        wait_until(
            lambda: len(daemon.daemon.queue) == 1, what="the file queued"
        )  # workers hold off
        assert files_under(dirs["uploads"]) == {"report.txt": b"waits for a clamd we can trust\n"}
        assert files_under(dirs["processed"]) == {}

        stock_clamd.stop()  # the operator adds AlertExceedsMax and restarts clamd
        stock_clamd.conf.write_text(stock_clamd.conf.read_text() + "AlertExceedsMax yes\n")
        stock_clamd.start()
        events.wait_for("clamd.trusted", timeout_s=30)
        events.wait_for("file.clean", path="report.txt")
        assert files_under(dirs["processed"]) == {"report.txt": b"waits for a clamd we can trust\n"}
        assert get(daemon, "/readyz").status == 200
        assert healthcheck(dirs)[0] == 0
    finally:
        daemon.close()


def test_a_reload_that_loses_the_signatures_makes_the_daemon_unready(
    make_settings: MakeSettings, own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    lose_eicar = f"rm {own_clamd.db / 'watcher-test.ndb'}"
    daemon = Service(
        make_settings(
            clamav_socket=own_clamd.socket, definitions_dir=own_clamd.db, update_command=lose_eicar
        )
    )
    daemon.start()
    try:
        events.wait_for("clamd.trusted")
        assert get(daemon, "/readyz").status == 200
        daemon.jobs.run_now("update-definitions")
        events.wait_for("definitions.updated", timeout_s=60)
        (untrusted,) = events.wait_for("clamd.untrusted")
        assert "canary eicar" in untrusted["problem"] and "got OK" in untrusted["problem"]
        ready = get(daemon, "/readyz")
        assert ready.status == 503 and "clamd_canaries" in ready.json()["failing"]
        assert healthcheck(dirs)[0] == 1
    finally:
        daemon.close()


def test_watcher_refuses_a_deep_nest_that_a_stock_clamd_calls_clean(stock_clamd: Clamd) -> None:
    """The nest test's other half: watcher's own depth limit, whatever clamd's settings."""
    from watcher.archives import ArchiveLimits, Inspector  # here: the suite runs on older code

    deep = nest(17, INFECTED)
    fd = os.memfd_create("deep")
    try:
        os.write(fd, deep)
        said = stock_clamd.scanner.scan_fd(fd)
        verdict = Inspector(ArchiveLimits(), stock_clamd.scanner).check(fd, said)
    finally:
        os.close(fd)
    assert isinstance(said, Clean)  # clamd's blind spot, as measured
    assert isinstance(verdict, NotScanned) and verdict.cause == "limits"
