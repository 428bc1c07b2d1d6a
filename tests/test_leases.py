"""Staging leases (watcher/leases.py): a daemon's claims are adopted once its lease has stopped
moving for the lease bound, never while it renews it, even where its flock cannot be seen
from another host (NFS mounted `nolock`); and a replica cut off from clamd hands its claims
back to the others."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.files import assert_each_exactly_once, delivered_count, files_under, staged
from watcher import leases
from watcher.claims import Claim, Staging
from watcher.errors import LeaseLost
from watcher.leases import LEASE, renew_interval_s
from watcher.service import Service

LEASE_S = 30.0
RENEW_S = renew_interval_s(LEASE_S)
pytestmark = pytest.mark.usefixtures("hosts_unknown")  # but for the same-host test below


class Clock:
    """A monotonic clock the test moves (every daemon of a test shares it, like real hosts'
    clocks that run at one rate though they never agree on the time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nolock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lock check succeeds, as on NFS mounted `nolock`, where each host locks only in
    its own kernel: another host's flock is never seen."""

    def lock_never_seen(staging: Staging, name: str) -> int | None:
        try:
            return os.open(f"{name}/lock", os.O_RDWR | os.O_CLOEXEC, dir_fd=staging.root_fd)
        except OSError:
            return None

    monkeypatch.setattr(Staging, "_lock_if_dead", lock_never_seen)


def opened(root: Path, clock: Clock) -> Staging:
    root.parent.mkdir(exist_ok=True)
    staging = Staging(root, LEASE_S, clock)
    staging.open()
    return staging


def claim(staging: Staging, uploads: Path, name: str, body: bytes) -> Claim | None:
    (uploads / name).write_bytes(body)
    parent = os.open(uploads, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return staging.claim(parent, name, name)
    finally:
        os.close(parent)


def die(staging: Staging) -> None:
    """SIGKILL, as the staging directory sees it: the flock goes, renewals stop."""
    os.close(staging._lock_fd)  # type: ignore[arg-type]


def tick(clock: Clock, *alive: Staging) -> None:
    """One renewal interval passes; the living renew their leases."""
    clock.now += RENEW_S
    for staging in alive:
        assert staging.renew_lease()


def test_on_the_same_host_a_dead_daemons_claims_are_adopted_at_once_a_live_ones_never(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart after SIGKILL on one host (the usual case): one kernel keeps every lock, so
    the free flock tells at once and the claims wait for no lease bound. A live daemon of
    that host holds its flock: its claims stay its own, however long we look."""
    monkeypatch.setattr("watcher.claims.host_identity", leases.host_identity)
    assert leases.host_identity() is not None
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    live, dead = opened(uploads / ".watcher", clock), opened(uploads / ".watcher", clock)
    kept = claim(live, uploads, "live.txt", b"live's")
    lost = claim(dead, uploads, "dead.txt", b"dead's")
    assert kept is not None and lost is not None
    die(dead)

    restarted = opened(uploads / ".watcher", clock)
    adopted = restarted.recover()  # no time has passed: the lease bound was not waited for

    assert [c.rel for c in adopted] == ["dead.txt"]
    assert adopted[0].data.read_bytes() == b"dead's" and not dead.dir.exists()
    for _ in range(3 * int(LEASE_S / RENEW_S)):
        tick(clock, live, restarted)
        assert restarted.recover() == []
    assert kept.data.read_bytes() == b"live's" and live.lease.held()


@pytest.mark.usefixtures("nolock")
def test_a_live_daemon_whose_lock_is_not_seen_is_never_adopted_while_it_renews(
    tmp_path: Path, clock: Clock
) -> None:
    """Three lease bounds of renewals: its claim stays its own. Then it dies: its claim is
    adopted after the bound, within two renewal intervals more."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    owner, other = opened(uploads / ".watcher", clock), opened(uploads / ".watcher", clock)
    kept = claim(owner, uploads, "kept.txt", b"mine")
    assert kept is not None
    for _ in range(3 * int(LEASE_S / RENEW_S)):
        tick(clock, owner, other)
        assert not other.orphans_due()
        assert other.recover() == []
    assert kept.data.read_bytes() == b"mine" and owner.lease.held()

    died_at = clock.now
    die(owner)
    adopted: list[Claim] = []
    while not adopted:
        tick(clock, other)
        if other.orphans_due():
            adopted = other.recover()
    assert [c.rel for c in adopted] == ["kept.txt"]
    assert adopted[0].data.read_bytes() == b"mine" and adopted[0].data.parent == other.dir
    assert LEASE_S <= clock.now - died_at <= LEASE_S + 2 * RENEW_S
    assert not owner.dir.exists()


def test_an_expired_lease_is_adopted_only_once_its_flock_is_free(
    tmp_path: Path, clock: Clock
) -> None:
    """Where flock works it still counts: a daemon that holds its lock is alive, however
    stale its lease (its renewing thread stuck, say)."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    stuck, other = opened(uploads / ".watcher", clock), opened(uploads / ".watcher", clock)
    assert claim(stuck, uploads, "stuck.txt", b"s") is not None
    for _ in range(2 * int(LEASE_S / RENEW_S)):
        tick(clock, other)
        assert other.recover() == []
    die(stuck)
    tick(clock, other)
    assert [c.rel for c in other.recover()] == ["stuck.txt"]


def test_a_clean_stop_with_claims_left_releases_them_at_once(tmp_path: Path, clock: Clock) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    stopping, other = opened(uploads / ".watcher", clock), opened(uploads / ".watcher", clock)
    assert claim(stopping, uploads, "left.txt", b"l") is not None
    stopping.close()
    assert other.orphans_due()
    assert [c.rel for c in other.recover()] == ["left.txt"]


@pytest.mark.usefixtures("nolock")  # frozen, it still holds its flock: another host's
def test_an_owner_whose_lease_lapsed_claims_and_delivers_nothing_and_stops_once_taken(
    tmp_path: Path, clock: Clock
) -> None:
    """Frozen (or cut off from the volume) for longer than half the bound, a daemon acts on
    no claim; once another daemon took its lease, it never renews it again."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    frozen, other = opened(uploads / ".watcher", clock), opened(uploads / ".watcher", clock)
    mine = claim(frozen, uploads, "mine.txt", b"m")
    assert mine is not None
    other.recover()  # the other daemon's first look at the frozen one's lease
    clock.now += LEASE_S / 2
    assert not frozen.lease.held()
    assert claim(frozen, uploads, "new.txt", b"n") is None
    assert (uploads / "new.txt").read_bytes() == b"n"  # left for whoever holds a lease
    with pytest.raises(LeaseLost):
        frozen.note_dest(mine, tmp_path / "processed" / "mine.txt")
    clock.now += LEASE_S / 2
    assert other.renew_lease()
    assert [c.rel for c in other.recover()] == ["mine.txt"]
    assert not frozen.renew_lease()  # woke up: taken
    assert not frozen.lease.held()
    frozen.close()


def test_two_daemons_that_judge_one_lease_expired_take_it_once(
    tmp_path: Path, clock: Clock
) -> None:
    root = tmp_path / "uploads" / ".watcher"
    dead = opened(root, clock)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stamp = leases.read_stamp(root_fd, dead.dir.name)
        assert leases.take(root_fd, dead.dir.name, stamp, "a")
        assert not leases.take(root_fd, dead.dir.name, stamp, "b")
    finally:
        os.close(root_fd)
    assert sorted(os.listdir(dead.dir)) == ["journal-000001", "lock", "taken-a"]


def test_a_lease_renewed_after_it_was_judged_expired_is_given_back(
    tmp_path: Path, clock: Clock
) -> None:
    """The owner renewed between the adopter's last look and its rename: alive after all."""
    root = tmp_path / "uploads" / ".watcher"
    owner = opened(root, clock)
    os.utime(owner.dir / LEASE, ns=(0, 0))  # as it was when the adopter last looked
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stamp = leases.read_stamp(root_fd, owner.dir.name)
        assert owner.renew_lease()
        assert not leases.take(root_fd, owner.dir.name, stamp, "adopter")
    finally:
        os.close(root_fd)
    assert (owner.dir / LEASE).exists()
    assert owner.renew_lease()


# -- daemons as processes ------------------------------------------------------------------


def corpus(count: int) -> dict[str, bytes]:
    return {f"f{n:03}.bin": EICAR if n % 7 == 3 else b"file %d\n" % n for n in range(count)}


def claims_of(daemon: DaemonProcess, uploads: Path) -> int:
    """How many claims a daemon holds (its staging directory is named after its pid)."""
    return len(list((uploads / ".watcher").glob(f"d-{daemon.pid}-*/*.data")))


def stuck_replica(
    make_clamd: Callable[..., Clamd], subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> tuple[DaemonProcess, Clamd, dict[str, bytes]]:
    """A replica whose own clamd froze as files arrived: it holds claims it cannot finish."""
    own = make_clamd("own-clamd")
    env = {**subprocess_env, "CLAMAV_SOCKET": str(own.socket), "WATCHER_SWEEP_INTERVAL_S": "3600"}
    stuck = DaemonProcess(env).start()
    own.freeze()
    files = corpus(30)
    for name, body in files.items():
        (dirs["uploads"] / name).write_bytes(body)
    wait_until(lambda: claims_of(stuck, dirs["uploads"]), 20, "the replica's first claims")
    return stuck, own, files


def test_a_killed_replicas_claims_are_taken_over_within_the_lease_bound(
    make_clamd: Callable[..., Clamd], subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """No sweep and no restart: the running replica's lease keeper sees the dead one's lease
    stop and adopts its claims within the bound plus two renewal intervals; every file ends
    once."""
    stuck, _, files = stuck_replica(make_clamd, subprocess_env, dirs)
    other = DaemonProcess({**subprocess_env, "WATCHER_SWEEP_INTERVAL_S": "3600"}).start()
    held = claims_of(stuck, dirs["uploads"])
    assert held > 0
    stuck.kill()
    killed_at = time.time()
    adopted = other.events.wait_for("staging.adopted", count=held, timeout_s=30)
    took_s = max(datetime.fromisoformat(r["time"]).timestamp() for r in adopted) - killed_at
    lease_s = float(subprocess_env["WATCHER_STAGING_LEASE_S"])
    assert took_s <= lease_s + 2 * renew_interval_s(lease_s) + 2.0  # + a busy machine's delay
    wait_until(lambda: delivered_count(dirs) == len(files), 30, "every file delivered")
    assert other.terminate() == 0
    assert_each_exactly_once(dirs, files)
    assert staged(dirs["uploads"]) == []


def test_a_replica_cut_off_from_clamd_hands_its_claims_to_the_others(
    make_clamd: Callable[..., Clamd], subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Its clamd stopped mid-scan: the claims it held go back to uploads (`file.released`),
    another replica scans them; it delivers nothing unscanned, and nothing is lost."""
    stuck, own, files = stuck_replica(make_clamd, subprocess_env, dirs)
    other = DaemonProcess({**subprocess_env, "WATCHER_SWEEP_INTERVAL_S": "3600"}).start()
    held = claims_of(stuck, dirs["uploads"])
    own.stop()  # its in-flight scans fail; it marks clamd down
    stuck.events.wait_for("clamd.down")
    stuck.events.wait_for("file.released", count=held)
    wait_until(lambda: delivered_count(dirs) == len(files), 40, "every file delivered")
    assert stuck.events.count("file.clean", "file.infected", "file.unscanned") == 0
    assert other.terminate() == 0 and stuck.terminate() == 0
    assert_each_exactly_once(dirs, files)
    assert staged(dirs["uploads"]) == []


def test_a_replica_whose_clamd_died_mid_scan_hands_back_even_the_claims_it_was_scanning(
    make_clamd: Callable[..., Clamd], subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Its clamd is SIGKILLed in the middle of scans (no answer: each such file counts an
    attempt and waits, as a file that kills clamd must): once clamd has been down for the
    lease bound those claims go back to uploads too, the other replica scans every file, and
    the cut-off one delivers nothing more."""
    own = make_clamd("own-clamd")
    env = {**subprocess_env, "WATCHER_SWEEP_INTERVAL_S": "3600"}
    cut = DaemonProcess({**env, "CLAMAV_SOCKET": str(own.socket)}).start()
    files = {f"big{n:02}.bin": os.urandom(4 << 20) for n in range(30)}
    for name, body in files.items():
        (dirs["uploads"] / name).write_bytes(body)
    wait_until(lambda: claims_of(cut, dirs["uploads"]) >= 4, 20, "scans in flight")
    own.freeze()  # mid-scan: what it accepted, it never answers
    other = DaemonProcess(env).start()
    held = claims_of(cut, dirs["uploads"])
    delivered_before = cut.events.count("file.clean", "file.infected", "file.unscanned")
    os.kill(own.pid, signal.SIGKILL)
    cut.events.wait_for("file.retry")  # a scan clamd broke off: an attempt of the file's own
    cut.events.wait_for("file.released", count=held, timeout_s=30)
    wait_until(lambda: delivered_count(dirs) == len(files), 60, "every file delivered")
    assert cut.events.count("file.clean", "file.infected", "file.unscanned") == delivered_before
    assert claims_of(cut, dirs["uploads"]) == 0
    assert other.terminate() == 0 and cut.terminate() == 0
    assert_each_exactly_once(dirs, files)
    assert staged(dirs["uploads"]) == []


def test_a_claim_already_scanned_is_never_released_while_clamd_is_down(
    make_clamd: Callable[..., Clamd],
    start_daemon: Callable[..., Service],
    dirs: dict[str, Path],
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file scanned clean but waiting for space in processed stays claimed while clamd is
    down (it needs no clamd, and a copy back in uploads could be delivered twice); one not
    yet scanned goes back to uploads; both end once when space and clamd return."""
    own = make_clamd("own-clamd")
    service = start_daemon(clamav_socket=own.socket)
    full = threading.Event()
    full.set()
    place = service.daemon.deliverer._place

    def place_unless_full(claim: Any, fd: int, dir_fd: int, directory: str, *args: Any) -> str:
        if full.is_set() and Path(directory).is_relative_to(dirs["processed"]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return place(claim, fd, dir_fd, directory, *args)

    monkeypatch.setattr(service.daemon.deliverer, "_place", place_unless_full)
    (dirs["uploads"] / "scanned.txt").write_bytes(b"clean, waiting for space")
    events.wait_for("storage.full", path="scanned.txt")
    retry_due = time.time() + 5.0  # the retry of a full destination: 5 s after its refusal
    own.stop()
    (dirs["uploads"] / "unscanned.txt").write_bytes(b"arrives while clamd is down")
    events.wait_for("file.released", path="unscanned.txt")
    # Its retry comes due while clamd is down (then three rounds of handing back): it stays.
    time.sleep(max(0.0, retry_due - time.time()) + 1.5)
    assert {r["path"] for r in events.named("file.released")} == {"unscanned.txt"}
    assert not (dirs["uploads"] / "scanned.txt").exists()

    full.clear()
    own.start()
    events.wait_for("file.clean", path="scanned.txt", timeout_s=30)
    events.wait_for("file.clean", path="unscanned.txt", timeout_s=30)
    assert files_under(dirs["processed"]) == {
        "scanned.txt": b"clean, waiting for space",
        "unscanned.txt": b"arrives while clamd is down",
    }
    wait_until(lambda: staged(dirs["uploads"]) == [], 10, "claims dropped once recorded")
