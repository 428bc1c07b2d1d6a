"""Provenance attributes (user.watcher.*) on delivered files: on this machine's filesystem for a
linked delivery, on a copy across mounts, and skipped cleanly where the filesystem has none."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness.events import Events
from harness.files import files_under
from watcher import provenance
from watcher.service import Service

Start = Callable[..., Service]


def test_a_delivered_file_carries_its_sha256_verdict_definitions_and_scan_time(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    service = start_daemon()
    upload = dirs["uploads"].parent / "doc.txt"
    upload.write_bytes(b"plain text")
    os.setxattr(upload, "user.watcher.verdict", b"clean, trust me")  # an uploader's lie
    os.setxattr(upload, "user.watcher.note", b"planted")
    upload.rename(dirs["uploads"] / "doc.txt")
    events.wait_for("file.clean", path="doc.txt")
    attrs = provenance.read(dirs["processed"] / "doc.txt")
    assert set(attrs) == {"sha256", "verdict", "definitions", "scanned_at"}
    assert attrs["sha256"] == hashlib.sha256(b"plain text").hexdigest()
    assert attrs["verdict"] == "clean"
    assert attrs["definitions"] == service.daemon.scanner.version()
    scanned = datetime.fromisoformat(attrs["scanned_at"])
    assert timedelta(0) <= datetime.now(UTC) - scanned < timedelta(minutes=1)


def test_a_file_delivered_without_scanning_says_so(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(scanning_enabled=False)
    (dirs["uploads"] / "raw.bin").write_bytes(b"raw")
    events.wait_for("file.unscanned", path="raw.bin")
    attrs = provenance.read(dirs["processed"] / "raw.bin")
    assert attrs["verdict"] == "unscanned" and "definitions" not in attrs


@pytest.fixture
def ramfs_processed(dirs: dict[str, Path]) -> Iterator[Path]:
    """processed on ramfs: another filesystem (a copy, not a link), without user xattrs."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    dirs["processed"].mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(dirs["processed"])], check=True)
    try:
        yield dirs["processed"]
    finally:
        subprocess.run(["umount", "-l", str(dirs["processed"])], check=False)


def test_where_the_filesystem_has_no_user_attributes_delivery_goes_on(
    start_daemon: Start, dirs: dict[str, Path], events: Events, ramfs_processed: Path
) -> None:
    start_daemon()
    for n in range(3):
        (dirs["uploads"] / f"f{n}.txt").write_bytes(b"file %d" % n)
    events.wait_for("file.clean", count=3)
    assert files_under(ramfs_processed) == {f"f{n}.txt": b"file %d" % n for n in range(3)}
    assert provenance.read(ramfs_processed / "f0.txt") == {}
    skipped = events.named("provenance.skipped")
    assert len(skipped) == 1 and skipped[0]["reason"] == "Operation not supported"


def test_a_copy_across_filesystems_keeps_the_attributes(tmp_path: Path) -> None:
    """The delivery's copy (fsops.copy_to_new_file) takes user.watcher.* along, nothing else."""
    from watcher.fsops import copy_to_new_file

    source = tmp_path / "source"
    source.write_bytes(b"bytes")
    os.setxattr(source, "user.watcher.verdict", b"clean")
    os.setxattr(source, "user.other", b"not ours")
    target = tmp_path / "target"
    target.mkdir()
    fd = os.open(source, os.O_RDONLY)
    dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_to_new_file(fd, dir_fd, "copy", 0o644)
    finally:
        os.close(fd)
        os.close(dir_fd)
    assert provenance.read(target / "copy") == {"verdict": "clean"}
    assert "user.other" not in os.listxattr(target / "copy")
