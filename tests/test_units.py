"""Pure pieces: reply parsing, name suffixes, crash recovery of claims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from watcher.deliver import Deliverer
from watcher.fsops import noclobber_names
from watcher.staging import Staging
from watcher.verdict import Clean, Infected, NotScanned, parse_reply


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("fd[10]: OK", Clean()),
        ("stream: OK", Clean()),
        ("fd[10]: Eicar-Test-Signature FOUND", Infected("Eicar-Test-Signature")),
        ("stream: Win.Test.EICAR_HDB-1 FOUND", Infected("Win.Test.EICAR_HDB-1")),
    ],
)
def test_explicit_replies(reply: str, verdict: object) -> None:
    assert parse_reply(reply) == verdict


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "OK",
        "fd[10]: OKAY",
        "/some/path: OK",  # a reply for a path we never sent
        "fd[10]: Can't open file or directory ERROR",
        "fd[10]: lstat() failed: No such file or directory. ERROR",
        "stream: OK\nstream: Eicar FOUND",
        "PONG",
    ],
)
def test_anything_but_an_explicit_ok_is_not_clean(reply: str) -> None:
    verdict = parse_reply(reply)
    assert isinstance(verdict, NotScanned) and verdict.transient


def test_size_limits_are_unscannable_never_clean() -> None:
    assert parse_reply("INSTREAM size limit exceeded. ERROR") == NotScanned(
        "exceeds clamd StreamMaxLength", transient=False
    )
    limited = parse_reply("fd[3]: Heuristics.Limits.Exceeded.MaxFileSize FOUND")
    assert isinstance(limited, NotScanned) and not limited.transient


def test_noclobber_names_keep_extension_and_255_bytes() -> None:
    nth = noclobber_names("photo.jpg")
    assert [nth(0), nth(1), nth(12)] == ["photo.jpg", "photo (1).jpg", "photo (12).jpg"]
    long = noclobber_names("é" * 125 + ".txt")
    assert all(len(os.fsencode(long(n))) <= 255 for n in range(0, 200, 7))
    assert noclobber_names(".bashrc")(1) == ".bashrc (1)"


def _claim_files(staging: Staging, uploads: Path, name: str, body: bytes) -> Path:
    upload = uploads / name
    upload.write_bytes(body)
    claim = staging.claim(upload, name)
    assert claim is not None
    return claim.data


def test_recovery_redoes_claims_left_by_a_dead_daemon(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    dead = Staging(uploads / ".watcher")
    dead.open()
    _claim_files(dead, uploads, "a.txt", b"a")
    os.close(dead._lock_fd)  # type: ignore[arg-type]  # the process died: its flock is gone
    alive = Staging(uploads / ".watcher")
    alive.open()
    claims = alive.recover()
    assert [c.rel for c in claims] == ["a.txt"]
    assert claims[0].data.read_bytes() == b"a" and claims[0].data.parent == alive.dir
    assert not dead.dir.exists()


def test_recovery_leaves_a_living_daemons_claims_alone(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    first = Staging(uploads / ".watcher")
    first.open()
    data = _claim_files(first, uploads, "b.txt", b"b")
    second = Staging(uploads / ".watcher")
    second.open()
    assert second.recover() == []
    assert data.read_bytes() == b"b"


def test_crash_between_link_and_unlink_is_finished_not_delivered_twice(tmp_path: Path) -> None:
    uploads, processed = tmp_path / "uploads", tmp_path / "processed"
    uploads.mkdir()
    staging = Staging(uploads / ".watcher")
    staging.open()
    deliverer = Deliverer(processed, tmp_path / "q", staging)
    deliverer.prepare()
    data = _claim_files(staging, uploads, "c.txt", b"c")
    claim = staging.recover()[0]
    staging.note_dest(claim, processed / "c.txt")  # what _move does before linking
    os.link(data, processed / "c.txt")  # ... and the crash came before the unlink
    reloaded = staging.recover()[0]
    assert json.loads(reloaded.record.read_text())["dest"] == str(processed / "c.txt")
    assert deliverer.finish_interrupted(reloaded) == processed / "c.txt"
    assert not data.exists() and not reloaded.record.exists()
    assert os.listdir(processed) == ["c.txt"] and staging.recover() == []


def test_claim_record_without_data_is_dropped(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    staging = Staging(uploads / ".watcher")
    staging.open()
    data = _claim_files(staging, uploads, "d.txt", b"d")
    data.unlink()  # delivered; the crash came before the record was removed
    assert staging.recover() == []
    assert [p.name for p in staging.dir.iterdir()] == ["lock"]
