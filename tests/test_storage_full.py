"""A full destination: files wait, the operator hears it once, and once more when space returns."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR
from harness.events import Events
from harness.files import files_under
from watcher.service import Service

BIG = b"x" * 4096


def test_full_processed_logged_once_while_small_files_and_quarantine_still_flow(
    start_daemon: Callable[..., Service],
    dirs: dict[str, Path],
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by `make soak`: every delivery that still succeeded while processed was full (a
    small file in the space a failed copy gave back, an infected file to quarantine) logged
    `storage.ok`, and the next retry `storage.full` again, dozens of times a minute."""
    daemon = start_daemon()
    full = threading.Event()
    full.set()
    place = daemon.daemon.deliverer._place

    def place_unless_full(claim: Any, fd: int, dir_fd: int, directory: str, *args: Any) -> str:
        too_big = os.fstat(fd).st_size >= len(BIG)  # a nearly full disk: small files still fit
        if full.is_set() and too_big and Path(directory).is_relative_to(dirs["processed"]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return place(claim, fd, dir_fd, directory, *args)

    monkeypatch.setattr(daemon.daemon.deliverer, "_place", place_unless_full)
    (dirs["uploads"] / "big.bin").write_bytes(BIG)
    events.wait_for("storage.full", path="big.bin")
    (dirs["uploads"] / "small.txt").write_bytes(b"fits")
    (dirs["uploads"] / "e.com").write_bytes(EICAR)
    events.wait_for("file.clean", path="small.txt")
    events.wait_for("file.infected", path="e.com")
    assert events.named("storage.ok") == []
    assert files_under(dirs["processed"]) == {"small.txt": b"fits"}

    full.clear()
    events.wait_for("file.clean", path="big.bin")
    (ok,) = events.wait_for("storage.ok")
    assert ok["dest"] == str(dirs["processed"])
    assert len(events.named("storage.full")) == 1
    assert files_under(dirs["processed"]) == {"small.txt": b"fits", "big.bin": BIG}
