"""Entries whose bytes are not the uploader's to give: never read, never moved, never delivered."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import EICAR
from harness.events import Events
from harness.files import files_under, quarantined
from watcher.service import Service

Start = Callable[..., Service]


def test_symlink_is_rejected_and_its_target_untouched(
    start_daemon: Start, dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    infected_target = tmp_path / "bad.com"
    infected_target.write_bytes(EICAR)
    start_daemon()
    (dirs["uploads"] / "link.txt").symlink_to(secret)
    (dirs["uploads"] / "link.com").symlink_to(infected_target)
    (dirs["uploads"] / "dirlink").symlink_to(tmp_path)
    events.wait_for("file.rejected", path="link.txt", reason="symlink")
    events.wait_for("file.rejected", path="link.com", reason="symlink")
    assert (dirs["uploads"] / "link.txt").is_symlink() and secret.read_bytes() == b"not yours"
    assert infected_target.read_bytes() == EICAR
    assert files_under(dirs["processed"]) == {} and quarantined(dirs["quarantine"]) == []
    assert events.named("file.rejected", path="dirlink/secret.txt") == []


def test_fifo_device_and_socket_are_rejected_without_blocking(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    os.mkfifo(dirs["uploads"] / "pipe")
    os.mknod(dirs["uploads"] / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dirs["uploads"] / "sock"))
    (dirs["uploads"] / "after.txt").write_bytes(b"still flows")
    for name in ("pipe", "null", "sock"):
        events.wait_for("file.rejected", path=name, reason="not a regular file")
    events.wait_for("file.clean", path="after.txt")
    assert stat.S_ISFIFO(os.lstat(dirs["uploads"] / "pipe").st_mode)
    sock.close()


def test_hard_linked_file_is_rejected_and_left_in_place(
    start_daemon: Start, dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    private = tmp_path / "private.db"
    private.write_bytes(b"someone else's bytes")
    start_daemon()
    os.link(private, dirs["uploads"] / "innocent.txt")
    events.wait_for("file.rejected", path="innocent.txt", reason="more than one hard link")
    assert (dirs["uploads"] / "innocent.txt").read_bytes() == b"someone else's bytes"
    assert private.stat().st_nlink == 2
    assert files_under(dirs["processed"]) == {}


def test_rejection_is_logged_once_per_entry_not_per_sweep(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    os.mkfifo(dirs["uploads"] / "pipe")
    daemon = start_daemon()
    events.wait_for("file.rejected", path="pipe")
    for _ in range(3):
        before = daemon.daemon.intake.sweeps
        daemon.daemon.intake.request_sweep()
        events.wait_for("intake.swept", count=before + 1)
    assert len(events.named("file.rejected", path="pipe")) == 1


def test_slow_writer_with_payload_at_the_end_is_never_judged_half_written(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(settle_s=0.2)
    target = dirs["uploads"] / "slow.bin"
    released = threading.Event()

    def slow_writer() -> None:
        with open(target, "wb") as f:
            for _ in range(10):
                f.write(b"harmless prefix " * 64)
                f.flush()
                released.wait(0.15)  # a slow client: pauses longer than the settle time
            f.write(EICAR)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    writer.join()
    (_record,) = events.wait_for("file.infected", path="slow.bin")
    assert events.named("file.clean") == []
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["bytes"].endswith(EICAR) and meta["size"] == 10 * 16 * 64 + len(EICAR)
    assert files_under(dirs["processed"]) == {}


def test_writer_that_keeps_file_open_is_waited_for(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(settle_s=0.1)
    target = dirs["uploads"] / "open.txt"
    with open(target, "wb") as f:
        f.write(b"first half ")
        f.flush()
        deadline = time.monotonic() + 0.6  # well past the settle time, still open
        while time.monotonic() < deadline:
            assert not (dirs["processed"] / "open.txt").exists()
            time.sleep(0.05)
        f.write(b"second half")
    events.wait_for("file.clean", path="open.txt")
    assert (dirs["processed"] / "open.txt").read_bytes() == b"first half second half"
