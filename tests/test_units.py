"""Pure pieces: reply parsing, name suffixes, crash recovery of claims."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loguru import logger

from watcher.claims import Claim, Journal, Staging
from watcher.delivery import Deliverer
from watcher.fsops import copy_to_new_file, noclobber_names
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
        "exceeds clamd StreamMaxLength", transient=False, cause="limits"
    )
    limited = parse_reply("fd[3]: Heuristics.Limits.Exceeded.MaxFileSize FOUND")
    assert isinstance(limited, NotScanned) and not limited.transient
    assert limited.cause == "limits"


def test_noclobber_names_keep_extension_and_255_bytes() -> None:
    nth = noclobber_names("photo.jpg")
    assert [nth(0), nth(1), nth(12)] == ["photo.jpg", "photo (1).jpg", "photo (12).jpg"]
    long = noclobber_names("é" * 125 + ".txt")
    assert all(len(os.fsencode(long(n))) <= 255 for n in range(0, 200, 7))
    assert noclobber_names(".bashrc")(1) == ".bashrc (1)"


def _claim_files(staging: Staging, uploads: Path, name: str, body: bytes) -> Path:
    upload = uploads / name
    upload.write_bytes(body)
    claim = _claim(staging, uploads, name)
    assert claim is not None
    return claim.data


def _claim(staging: Staging, uploads: Path, rel: str) -> Claim | None:
    parent = os.open((uploads / rel).parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return staging.claim(parent, os.path.basename(rel), rel)
    finally:
        os.close(parent)


def _die(staging: Staging) -> None:
    """What SIGKILL does to a daemon's staging: its flock and open journal just vanish."""
    os.close(staging._lock_fd)  # type: ignore[arg-type]


def test_recovery_redoes_claims_left_by_a_dead_daemon(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    dead = Staging(uploads / ".watcher")
    dead.open()
    (uploads / "sub dir").mkdir()
    _claim_files(dead, uploads, "sub dir/a\nb ü.txt", b"a")
    _die(dead)
    alive = Staging(uploads / ".watcher")
    alive.open()
    claims = alive.recover()
    assert [c.rel for c in claims] == ["sub dir/a\nb ü.txt"]
    assert claims[0].data.read_bytes() == b"a" and claims[0].data.parent == alive.dir
    assert not dead.dir.exists()
    _die(alive)  # and dies again before finishing: the claim moves on, name intact
    third = Staging(uploads / ".watcher")
    third.open()
    assert [c.rel for c in third.recover()] == ["sub dir/a\nb ü.txt"]


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
    dead = Staging(uploads / ".watcher")
    dead.open()
    processed.mkdir()
    data = _claim_files(dead, uploads, "c.txt", b"c")
    claim = Journal.read(dead.dir_fd)
    (claim_id,) = claim
    dead.journal.note(Claim(claim_id, "c.txt", data, 0.0), str(processed / "c.txt"))
    os.link(data, processed / "c.txt")  # ... and the crash came before the unlink
    _die(dead)
    staging = Staging(uploads / ".watcher")
    staging.open()
    deliverer = Deliverer(processed, tmp_path / "q", staging)
    deliverer.start()
    (reloaded,) = staging.recover()
    assert reloaded.dest == str(processed / "c.txt")
    assert deliverer.finish_interrupted(reloaded) == processed / "c.txt"
    assert not reloaded.data.exists()
    assert os.listdir(processed) == ["c.txt"]
    deliverer.close()
    staging.close()
    assert not staging.dir.exists()


def test_journal_line_without_data_is_dropped_and_torn_lines_ignored(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    dead = Staging(uploads / ".watcher")
    dead.open()
    data = _claim_files(dead, uploads, "d.txt", b"d")
    _claim_files(dead, uploads, "e.txt", b"e")
    data.unlink()  # d.txt was delivered; the crash came before its journal was settled
    with open(next(dead.dir.glob("journal-*")), "ab") as journal:
        journal.write(b'{"id": "torn')
    _die(dead)
    alive = Staging(uploads / ".watcher")
    alive.open()
    assert [c.rel for c in alive.recover()] == ["e.txt"]


def test_journal_segments_are_deleted_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("watcher.claims.SEGMENT_BYTES", 200)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    staging = Staging(uploads / ".watcher")
    staging.open()
    claims = []
    for n in range(20):
        (uploads / f"{n}.txt").write_bytes(b"x")
        claim = _claim(staging, uploads, f"{n}.txt")
        assert claim is not None
        claims.append(claim)
    assert len(list(staging.dir.glob("journal-*"))) > 3
    for claim in claims:
        staging.drop(claim)
    assert len(list(staging.dir.glob("journal-*"))) == 1  # only the current one
    staging.close()
    assert not staging.dir.exists()


def test_a_daemon_starting_up_is_never_adopted_and_a_dead_start_is_cleaned(
    tmp_path: Path,
) -> None:
    """Staging directories are locked under a t-* name first; recovery ignores fresh ones."""
    root = tmp_path / "uploads" / ".watcher"
    starting = root / "t-d-1-aaaa"
    starting.mkdir(parents=True)  # a daemon between mkdir and lock, right now
    dead = root / "t-d-2-bbbb"
    dead.mkdir()
    os.utime(dead, (0, 0))  # a start that died long ago
    staging = Staging(root)
    staging.open()
    assert staging.dir.name.startswith("d-") and (staging.dir / "lock").exists()
    assert staging.recover() == []
    assert starting.exists() and not dead.exists()


def test_log_budget_passes_ten_lines_a_second_per_event_and_counts_the_rest() -> None:
    from support import loguru_events

    from watcher.logs import LogBudget

    events, sink = loguru_events()
    try:
        budget = LogBudget("http.log_suppressed", per_s=10)
        for n in range(25):
            budget.log("http.client_error", now=100.0 + n / 100, n=n)
        budget.log("http.busy", now=100.5)
        budget.flush(now=101.0)  # the second is over: one line sums it up
        budget.log("http.client_error", now=101.1, n=99)
    finally:
        logger.remove(sink)
    assert [e["n"] for e in events.named("http.client_error")] == [*range(10), 99]
    assert len(events.named("http.busy")) == 1
    (summary,) = events.named("http.log_suppressed")
    assert summary["suppressed_event"] == "http.client_error" and summary["count"] == 15


def test_a_copy_keeps_the_holes_of_a_sparse_file(tmp_path: Path) -> None:
    """Issue 11.6: a copy (between mounts, or a private copy) never fills an upload's holes."""
    source = tmp_path / "sparse.bin"
    with open(source, "wb") as f:
        f.truncate(8 << 30)
        f.seek(4 << 30)
        f.write(b"middle")
    src = os.open(source, os.O_RDONLY)
    out_dir = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_to_new_file(src, out_dir, "copy.bin", 0o640)
    finally:
        os.close(src)
        os.close(out_dir)
    copy = tmp_path / "copy.bin"
    assert copy.stat().st_size == 8 << 30 and copy.stat().st_blocks * 512 < 1 << 20
    assert copy.stat().st_mode & 0o777 == 0o640
    with open(copy, "rb") as f:
        f.seek(4 << 30)
        assert f.read(6) == b"middle"
