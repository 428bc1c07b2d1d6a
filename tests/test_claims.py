"""Claims and their journal: a claimed upload is never lost nor delivered twice, whatever
daemon died when (watcher/claims.py, recovery in watcher/delivery.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.claims import Claim, Journal, Staging
from watcher.delivery import Deliverer


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
    """What SIGKILL does to a daemon's staging: its flock and open journal just vanish, and
    its lease is renewed no more."""
    os.close(staging._lock_fd)  # type: ignore[arg-type]


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recover_after_lease(staging: Staging, clock: Clock) -> list[Claim]:
    """A dead daemon's lease is seen unmoved for the whole bound, then its claims adopted."""
    assert staging.recover() == []  # first look: the lease might still move
    clock.now += LEASE_S
    staging.renew_lease()
    return staging.recover()


LEASE_S = 30.0
pytestmark = pytest.mark.usefixtures("hosts_unknown")  # each Staging another host's daemon


def test_recovery_redoes_claims_left_by_a_dead_daemon(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    clock = Clock()
    dead = Staging(uploads / ".watcher", LEASE_S, clock)
    dead.open()
    (uploads / "sub dir").mkdir()
    _claim_files(dead, uploads, "sub dir/a\nb ü.txt", b"a")
    _die(dead)
    alive = Staging(uploads / ".watcher", LEASE_S, clock)
    alive.open()
    claims = _recover_after_lease(alive, clock)
    assert [c.rel for c in claims] == ["sub dir/a\nb ü.txt"]
    assert claims[0].data.read_bytes() == b"a" and claims[0].data.parent == alive.dir
    assert not dead.dir.exists()
    _die(alive)  # and dies again before finishing: the claim moves on, name intact
    third = Staging(uploads / ".watcher", LEASE_S, clock)
    third.open()
    assert [c.rel for c in _recover_after_lease(third, clock)] == ["sub dir/a\nb ü.txt"]


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
    clock = Clock()
    dead = Staging(uploads / ".watcher", LEASE_S, clock)
    dead.open()
    processed.mkdir()
    data = _claim_files(dead, uploads, "c.txt", b"c")
    claim = Journal.read(dead.dir_fd)
    (claim_id,) = claim
    dead.journal.note(Claim(claim_id, "c.txt", data, 0.0), str(processed / "c.txt"))
    os.link(data, processed / "c.txt")  # ... and the crash came before the unlink
    _die(dead)
    staging = Staging(uploads / ".watcher", LEASE_S, clock)
    staging.open()
    deliverer = Deliverer(processed, tmp_path / "q", staging)
    deliverer.start()
    (reloaded,) = _recover_after_lease(staging, clock)
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
    clock = Clock()
    dead = Staging(uploads / ".watcher", LEASE_S, clock)
    dead.open()
    data = _claim_files(dead, uploads, "d.txt", b"d")
    _claim_files(dead, uploads, "e.txt", b"e")
    data.unlink()  # d.txt was delivered; the crash came before its journal was settled
    with open(next(dead.dir.glob("journal-*")), "ab") as journal:
        journal.write(b'{"id": "torn')
    _die(dead)
    alive = Staging(uploads / ".watcher", LEASE_S, clock)
    alive.open()
    assert [c.rel for c in _recover_after_lease(alive, clock)] == ["e.txt"]


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
