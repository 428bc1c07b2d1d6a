"""The Node.js example in docs/examples gets the verdict of a real upload from a real daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import EICAR, ROOT
from harness.events import wait_until
from harness.http_client import address
from watcher.service import Service

EXAMPLE = ROOT / "docs" / "examples" / "wait-for-verdict.mjs"


def run_example(daemon: Service, rel: str) -> subprocess.Popen[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    host, port = address(daemon)
    return subprocess.Popen(
        [node, str(EXAMPLE), rel, f"http://{host}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_example_waits_for_an_upload_written_after_it_asked(
    start_daemon: Callable[..., Service], dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    proc = run_example(daemon, "user 7/photo.jpg")
    wait_until(lambda: daemon.ops.verdicts.waiting == 1, 15, "the example's request")
    (dirs["uploads"] / "user 7").mkdir()
    (dirs["uploads"] / "user 7" / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    verdict = json.loads(out)
    assert verdict["state"] == "clean" and verdict["location"] == "processed/user 7/photo.jpg"


def test_example_exits_1_for_an_infected_upload(
    start_daemon: Callable[..., Service], dirs: dict[str, Path]
) -> None:
    daemon = start_daemon()
    (dirs["uploads"] / "bad.com").write_bytes(EICAR)
    proc = run_example(daemon, "bad.com")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert json.loads(out)["state"] == "infected"
