"""Separate mounts of one filesystem, as container volumes are: link() and rename() between
them fail with EXDEV although st_dev is the same. Deliveries, restores and rescans copy then;
a destination that keeps refusing makes the daemon not ready."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR
from harness.daemon import run_cli
from harness.events import Events, wait_until
from harness.files import files_under, quarantined
from harness.http_client import get
from watcher.clamav import scanner_from_settings
from watcher.definitions import DefinitionsState
from watcher.jobs import Jobs
from watcher.jobs.deliveries import Delivery
from watcher.service import Service

Start = Callable[..., Service]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def volumes(dirs: dict[str, Path], tmp_path: Path) -> Iterator[dict[str, Path]]:
    """uploads, processed and quarantine each a bind mount (one filesystem, three mounts)."""
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    mounted: list[Path] = []
    try:
        for name in ("uploads", "processed", "quarantine"):
            volume = tmp_path / f"volume-{name}"
            volume.mkdir()
            dirs[name].mkdir(exist_ok=True)
            _mount("--bind", str(volume), str(dirs[name]))
            mounted.append(dirs[name])
        yield dirs
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def _link_fails_between(a: Path, b: Path) -> None:
    """The premise: same st_dev, and still EXDEV."""
    assert a.stat().st_dev == b.stat().st_dev
    (a / ".probe").write_bytes(b"")
    with pytest.raises(OSError) as caught:
        os.link(a / ".probe", b / ".probe")
    assert caught.value.errno == errno.EXDEV
    (a / ".probe").unlink()


def test_files_are_delivered_between_separate_mounts_of_one_filesystem(
    start_daemon: Start, volumes: dict[str, Path], events: Events
) -> None:
    _link_fails_between(volumes["uploads"], volumes["processed"])
    start_daemon()
    (volumes["uploads"] / "sub").mkdir()
    clean = os.urandom(300_000)
    (volumes["uploads"] / "sub" / "clean.bin").write_bytes(clean)
    (volumes["uploads"] / "eicar.com").write_bytes(EICAR)
    events.wait_for("file.clean", path="sub/clean.bin")
    events.wait_for("file.infected", path="eicar.com")
    assert files_under(volumes["processed"]) == {"sub/clean.bin": clean}
    (record,) = quarantined(volumes["quarantine"])
    assert record["bytes"] == EICAR and record["original_path"] == "eicar.com"
    assert not events.named("file.error")
    assert files_under(volumes["uploads"]) == {}  # nothing left behind, no temp names either


def test_restore_across_mounts_allowlists_only_once_the_bytes_are_back(
    start_daemon: Start, volumes: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    start_daemon()
    (volumes["uploads"] / "fp.com").write_bytes(EICAR)
    (infected,) = events.wait_for("file.infected", path="fp.com")
    env = _cli_env(volumes)
    allowlist = volumes["state"] / "allowlist"

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    _mount("--bind", str(tmp_path / "volume-processed"), str(read_only))
    try:
        _mount("-o", "remount,bind,ro", str(read_only))
        failed = run_cli("quarantine", "restore", infected["id"], "--to", str(read_only), env=env)
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    assert failed.returncode == 2, failed.stderr
    assert not allowlist.exists() or list(allowlist.iterdir()) == []  # nothing allowlisted

    done = run_cli("quarantine", "restore", infected["id"], env=env)
    assert done.returncode == 0, done.stderr
    assert files_under(volumes["processed"]) == {"fp.com": EICAR}
    assert [p.name for p in allowlist.iterdir()] == [hashlib.sha256(EICAR).hexdigest()]
    assert not (volumes["quarantine"] / infected["id"]).exists()


def test_rescan_moves_a_late_detection_out_between_mounts(
    make_settings: Callable[..., Any], volumes: dict[str, Path]
) -> None:
    settings = make_settings()
    jobs = Jobs(settings, scanner_from_settings(settings), DefinitionsState())
    target = volumes["processed"] / "late.com"
    target.write_bytes(EICAR)
    st = target.stat()
    jobs.deliveries.append(
        Delivery(datetime.now(UTC), "late.com", "late.com", len(EICAR), None, st.st_dev, st.st_ino)
    )
    report = jobs.rescanner.run(datetime.now(UTC))
    assert report.infected == 1
    assert files_under(volumes["processed"]) == {}
    (meta,) = quarantined(volumes["quarantine"])
    assert meta["bytes"] == EICAR and meta["detected_late"] is True


def test_a_destination_that_refuses_every_file_makes_the_daemon_not_ready(
    start_daemon: Start, dirs: dict[str, Path], events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one faked seam: deliveries into processed fail (EIO) until the fault is cleared."""
    daemon = start_daemon(heartbeat_interval_s=0.2, retry_max_backoff_s=0.5)
    place = daemon.daemon.deliverer._place
    broken = True

    def failing(claim: Any, fd: int, dir_fd: int, directory: str, *args: Any) -> str:
        if broken and directory.startswith(str(dirs["processed"])):
            raise OSError(errno.EIO, "Input/output error")
        return place(claim, fd, dir_fd, directory, *args)

    monkeypatch.setattr(daemon.daemon.deliverer, "_place", failing)
    for n in range(3):
        (dirs["uploads"] / f"f{n}.txt").write_bytes(b"waits")
    (failing_event,) = events.wait_for("delivery.failing")
    assert failing_event["dest"] == str(dirs["processed"])
    ready = get(daemon, "/readyz")
    assert ready.status == 503
    assert "delivery" in ready.json()["failing"]
    assert "Input/output error" in ready.json()["checks"]["delivery"]
    health = wait_until(
        lambda: (r := run_cli("healthcheck", env=_cli_env(dirs))).returncode == 1 and r,
        what="healthcheck to report the failing destination",
    )
    assert "processed" in health.stdout and "Input/output error" in health.stdout
    assert files_under(dirs["processed"]) == {}

    broken = False
    events.wait_for("delivery.ok", dest=str(dirs["processed"]))
    for n in range(3):
        events.wait_for("file.clean", path=f"f{n}.txt")
    assert get(daemon, "/readyz").status == 200
    assert len(events.named("delivery.failing")) == 1


def _cli_env(dirs: dict[str, Path]) -> dict[str, str]:
    return {
        "WATCHER_UPLOADS_DIR": str(dirs["uploads"]),
        "WATCHER_PROCESSED_DIR": str(dirs["processed"]),
        "WATCHER_QUARANTINE_DIR": str(dirs["quarantine"]),
        "WATCHER_STATE_DIR": str(dirs["state"]),
    }
