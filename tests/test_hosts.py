"""Replicas on different hosts, simulated (harness.hosts): each `watcher run` in a network and
mount namespace of its own with its own clamd, all sharing one uploads/processed/quarantine
tree, polling it (inotify sees nothing another host does on NFS).

Run by `make replicas-test` (root; about 1.5 minutes), not by `make test`: pytest collects
these only with ``--hosts``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.daemon import DaemonProcess, daemon_env
from harness.events import wait_until
from harness.files import assert_each_exactly_once, delivered_count, staged
from harness.hosts import Host, View, missing_tools
from watcher.leases import renew_interval_s

pytestmark = pytest.mark.hosts

LEASE_S = 3.0
TAKEOVER_LIMIT_S = LEASE_S + 2 * renew_interval_s(LEASE_S) + 3.0  # + a busy machine's delay
# Nobody may adopt before the bound has passed since the owner's last renewal, one interval
# before the kill unless the machine held its renewals back: half the bound is still well
# after a watcher that trusted a free flock would adopt (at its next sweep, each second).
EARLIEST_TAKEOVER_S = LEASE_S / 2
DIRS = ("uploads", "processed", "quarantine")


@dataclass
class Replica:
    host: Host
    clamd: Clamd
    daemon: DaemonProcess

    def claims(self, shared: Path) -> int:
        """Claims this replica holds (its staging directory is named after its pid)."""
        return len(list((shared / "uploads" / ".watcher").glob(f"d-{self.daemon.pid}-*/*.data")))

    def cut_from_clamd(self) -> None:
        """Its clamd dies mid-scan (SIGKILL: no answer to what it was scanning)."""
        os.kill(self.clamd.pid, signal.SIGKILL)
        self.clamd.stop()

    def die(self) -> None:
        """The host goes: the daemon and its clamd are SIGKILLed."""
        self.daemon.kill()
        os.kill(self.clamd.pid, signal.SIGKILL)
        self.clamd.stop()


Cluster = Callable[[int, View], list[Replica]]


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    if missing_tools():
        pytest.fail(f"the host simulation needs {missing_tools()} (make replicas-test)")
    for name in DIRS:
        (tmp_path / "shared" / name).mkdir(parents=True)
    (tmp_path / "incoming").mkdir()
    return tmp_path / "shared"


@pytest.fixture
def cluster(tmp_path: Path, shared: Path) -> Iterator[Cluster]:
    """Start `count` more hosts with a clamd and a replica each, every replica ready."""
    replicas: list[Replica] = []

    def start(count: int, view: View) -> list[Replica]:
        for n in range(len(replicas), len(replicas) + count):
            host = Host(f"host{n}", shared, tmp_path / "view", view).start()
            clamd = host.clamd(tmp_path / f"clamd-{n}", disable_cache=True)
            replicas.append(Replica(host, clamd.start(), DaemonProcess(replica_env(host, clamd))))
            replicas[-1].daemon.prefix = host.prefix
            replicas[-1].daemon.start(timeout_s=60)
        return replicas[-count:]

    yield start
    for replica in replicas:
        if replica.daemon.alive:
            replica.daemon.terminate()
        replica.clamd.stop()
        replica.host.stop()


def replica_env(host: Host, clamd: Clamd, **settings: str) -> dict[str, str]:
    dirs = {name: host.data / name for name in DIRS} | {"state": host.private / "state"}
    return daemon_env(
        dirs,
        clamd,
        CLAMAV_SOCKET=str(clamd.local_socket),
        WATCHER_OBSERVER="polling",
        WATCHER_POLL_INTERVAL_S="0.5",
        WATCHER_SETTLE_S="0.5",
        WATCHER_SWEEP_INTERVAL_S="1",  # a watcher without leases would adopt at each sweep
        WATCHER_STAGING_LEASE_S=str(LEASE_S),
        WATCHER_UPDATE_COMMAND="",
        WATCHER_DEFINITIONS_DIR=str(clamd.db),
        WATCHER_HTTP_ADDR="127.0.0.1:0",  # each host's own loopback
        **settings,
    )


def make_files(count: int, seed: int) -> dict[str, bytes]:
    """1-32 KB of random bytes each; every 10th ends with EICAR."""
    rng = random.Random(seed)
    return {
        f"u{n:04}.bin": rng.randbytes(rng.randrange(1024, 32 * 1024))
        + (EICAR if n % 10 == 3 else b"")
        for n in range(count)
    }


class Stream:
    """Uploads arriving at `per_s` files a second, written aside and renamed in whole (as
    an app writing to the file server does); `sent` counts those in."""

    def __init__(self, shared: Path, files: dict[str, bytes], per_s: float) -> None:
        self.shared, self.files, self.per_s = shared, files, per_s
        self.sent = 0
        self._thread = threading.Thread(target=self._send, daemon=True)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def wait_sent(self, count: int) -> None:
        wait_until(lambda: self.sent >= count, 120, f"{count} files sent")

    def join(self) -> None:
        self._thread.join(timeout=120)

    def _send(self) -> None:
        incoming = self.shared.parent / "incoming"
        started = time.monotonic()
        for n, (name, body) in enumerate(self.files.items()):
            (incoming / name).write_bytes(body)
            os.rename(incoming / name, self.shared / "uploads" / name)
            self.sent = n + 1
            time.sleep(max(0.0, started + (n + 1) / self.per_s - time.monotonic()))


def event_times(replicas: list[Replica], name: str) -> list[float]:
    return [
        datetime.fromisoformat(r["time"]).timestamp()
        for replica in replicas
        for r in replica.daemon.events.named(name)
    ]


def total(replicas: list[Replica], name: str) -> int:
    return sum(len(r.daemon.events.named(name)) for r in replicas)


def hold_claims(replica: Replica, shared: Path) -> int:
    """Freeze the replica's clamd until it holds claims it cannot finish; how many."""
    replica.clamd.freeze()
    wait_until(lambda: replica.claims(shared) >= 2, 30, "claims held by a frozen clamd")
    time.sleep(0.5)  # its other workers take theirs too
    return replica.claims(shared)


@pytest.mark.parametrize("view", ["bind", "fuse"])
def test_three_hosts_deliver_a_stream_exactly_once_through_a_death_and_a_clamd_outage(
    cluster: Cluster, shared: Path, view: View
) -> None:
    """600 uploads at 25/s over three replicas. A third of the way, one host dies (SIGKILL,
    while it holds claims): the others adopt them, not before its lease has expired and
    within the lease bound plus two renewals.
    Two thirds of the way, another replica's clamd dies mid-scan: it hands its claims back
    and takes nothing new. Every file ends once, with its bytes, each scanned by a clamd."""
    replicas = cluster(3, view)
    dead, cut, survivor = replicas
    files = make_files(600, seed=7)
    stream = Stream(shared, files, per_s=25).start()

    stream.wait_sent(200)
    held = hold_claims(dead, shared)
    died_at = time.time()
    dead.die()

    stream.wait_sent(400)
    released = hold_claims(cut, shared)
    cut.cut_from_clamd()
    cut.daemon.events.wait_for("file.released", count=released, timeout_s=30)
    cut_at = time.time()

    stream.join()
    wait_until(lambda: delivered_count({"processed": shared / "processed",
                                        "quarantine": shared / "quarantine"}) == len(files),
               120, "every file delivered")  # fmt: skip
    adopted = event_times([cut, survivor], "staging.adopted")
    assert len(adopted) == held
    assert max(adopted) - died_at <= TAKEOVER_LIMIT_S, max(adopted) - died_at
    assert min(adopted) - died_at >= EARLIEST_TAKEOVER_S, min(adopted) - died_at  # not on flock
    after_cut = [t for t in event_times([cut], "file.clean") + event_times([cut], "file.infected")
                 if t > cut_at]  # fmt: skip
    assert after_cut == []  # nothing delivered without a clamd
    infected = sum(body.endswith(EICAR) for body in files.values())
    assert total(replicas, "file.infected") == infected
    assert total(replicas, "file.clean") == len(files) - infected
    assert total(replicas, "file.unscanned") == 0
    for replica in (cut, survivor):
        assert replica.daemon.terminate() == 0
    assert_each_exactly_once({name: shared / name for name in DIRS}, files)
    assert staged(shared / "uploads") == []
    assert list((shared / "uploads" / ".watcher").glob("d-*")) == []


def test_a_live_replica_whose_lock_no_other_host_sees_is_never_adopted(
    cluster: Cluster, shared: Path, tmp_path: Path
) -> None:
    """FUSE views (locks kernel-local, as on NFS `nolock`): a replica frozen in its scans but
    renewing its lease keeps its claims for four lease bounds while the other sweeps every
    second; once it dies, the other adopts them within the bound."""
    (alive,) = cluster(1, "fuse")
    files = make_files(20, seed=3)
    for name, body in files.items():
        (shared / "uploads" / name).write_bytes(body)
    held = hold_claims(alive, shared)
    (lock,) = (shared / "uploads" / ".watcher").glob(f"d-{alive.daemon.pid}-*/lock")
    probe = Host("probe", shared, tmp_path / "view", "fuse").start()
    try:
        seen = probe.run(
            sys.executable, "-c", LOCK_PROBE, str(probe.data / lock.relative_to(shared))
        )
    finally:
        probe.stop()
    assert seen.stdout.strip() == "free"  # its flock is invisible from another host
    (other,) = cluster(1, "fuse")

    time.sleep(4 * LEASE_S)
    assert alive.claims(shared) == held
    assert other.daemon.events.named("staging.adopted") == []

    died_at = time.time()
    alive.die()
    adopted = other.daemon.events.wait_for("staging.adopted", count=held, timeout_s=30)
    took_s = max(datetime.fromisoformat(r["time"]).timestamp() for r in adopted) - died_at
    assert EARLIEST_TAKEOVER_S <= took_s <= TAKEOVER_LIMIT_S
    wait_until(lambda: not staged(shared / "uploads"), 30, "the adopted claims delivered")
    assert other.daemon.terminate() == 0
    assert_each_exactly_once({name: shared / name for name in DIRS}, files)


LOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("locked")
"""
