"""Outages, crashes and company: files wait, nothing is lost, nothing is delivered twice."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.files import (
    assert_each_exactly_once,
    delivered_count,
    files_under,
    quarantined,
    staged,
)
from watcher.claims import Staging
from watcher.service import Service
from watcher.verdict import Clean, NotScanned, Verdict

Start = Callable[..., Service]


def corpus(n: int, seed: int = 7) -> dict[str, bytes]:
    """Mixed clean and infected files with awkward names; infected ones end with EICAR."""
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        name = f"d{i % 5}/file {i} ü.{rng.choice(['txt', 'bin', 'com'])}"
        body = rng.randbytes(rng.randrange(10, 5000))
        files[name] = body + EICAR if i % 7 == 0 else body
    return files


def drop(uploads: Path, files: dict[str, bytes]) -> None:
    for name, body in files.items():
        path = uploads / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def test_clamd_down_files_wait_then_flow_when_it_returns(
    make_settings: Callable[..., object], own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    daemon = Service(make_settings(clamav_socket=own_clamd.socket))  # type: ignore[arg-type]
    daemon.start()
    try:
        (dirs["uploads"] / "before.txt").write_bytes(b"ok")
        events.wait_for("file.clean", path="before.txt")
        own_clamd.stop()
        files = corpus(20)
        drop(dirs["uploads"], files)
        events.wait_for("clamd.down")
        assert files_under(dirs["processed"]) == {"before.txt": b"ok"}
        assert quarantined(dirs["quarantine"]) == []
        own_clamd.start()
        events.wait_for("clamd.up")
        events.wait_for("file.clean", count=1 + sum(not v.endswith(EICAR) for v in files.values()))
        events.wait_for("file.infected", count=sum(v.endswith(EICAR) for v in files.values()))
        assert len(events.named("clamd.down")) == 1
        files["before.txt"] = b"ok"
        assert_each_exactly_once(dirs, files)
    finally:
        daemon.close()


def test_clamd_frozen_past_the_scan_timeout_is_retried_never_passed(
    make_settings: Callable[..., object], own_clamd: Clamd, dirs: dict[str, Path], events: Events
) -> None:
    settings = make_settings(clamav_socket=own_clamd.socket, scan_timeout_s=0.5, workers=2)
    daemon = Service(settings)  # type: ignore[arg-type]
    daemon.start()
    try:
        own_clamd.freeze()
        (dirs["uploads"] / "frozen.com").write_bytes(EICAR)
        (dirs["uploads"] / "frozen.txt").write_bytes(b"plain")
        retry = events.wait_for("file.retry", path="frozen.txt")[0]
        assert retry["reason"] == "clamd did not answer within 0.5s"
        assert files_under(dirs["processed"]) == {}
        own_clamd.thaw()
        events.wait_for("file.infected", path="frozen.com")
        events.wait_for("file.clean", path="frozen.txt")
        assert_each_exactly_once(dirs, {"frozen.com": EICAR, "frozen.txt": b"plain"})
    finally:
        own_clamd.thaw()
        daemon.close()


@pytest.mark.parametrize("kill_after", [0, 5, 40])
def test_sigkill_then_restart_loses_nothing_and_doubles_nothing(
    dirs: dict[str, Path], subprocess_env: dict[str, str], kill_after: int
) -> None:
    files = corpus(120, seed=kill_after)
    first = DaemonProcess(subprocess_env).start()
    drop(dirs["uploads"], files)
    if kill_after:
        first.events.wait_for("file.clean", count=kill_after)
    first.kill()
    second = DaemonProcess(subprocess_env).start()
    total = len(files)
    wait_until(
        lambda: delivered_count(dirs) >= total and files_under(dirs["uploads"]) == {},
        60,
        "every file delivered after the restart",
    )
    assert second.terminate() == 0
    assert_each_exactly_once(dirs, files)
    assert staged(dirs["uploads"]) == []


def test_two_daemons_on_one_uploads_directory_take_each_file_once(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    a = DaemonProcess(subprocess_env).start()
    b = DaemonProcess(subprocess_env).start()
    files = corpus(300, seed=2)
    drop(dirs["uploads"], files)
    wait_until(
        lambda: delivered_count(dirs) >= len(files) and files_under(dirs["uploads"]) == {},
        60,
        "all files delivered",
    )
    assert a.terminate() == 0 and b.terminate() == 0
    assert_each_exactly_once(dirs, files)
    assert staged(dirs["uploads"]) == []
    assert a.events.named("file.clean") and b.events.named("file.clean")  # both did work
    assert not a.events.named("file.renamed") and not b.events.named("file.renamed")


def test_delivery_across_filesystems_is_complete_and_atomic(
    make_settings: Callable[..., object], dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    shm = Path("/dev/shm") / f"watcher-test-{os.getpid()}-{tmp_path.name}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    try:
        settings = make_settings(processed_dir=shm / "processed", quarantine_dir=shm / "q")
        daemon = Service(settings)  # type: ignore[arg-type]
        daemon.start()
        files = corpus(40, seed=3)
        drop(dirs["uploads"], files)
        events.wait_for("file.clean", count=sum(not v.endswith(EICAR) for v in files.values()))
        events.wait_for("file.infected", count=sum(v.endswith(EICAR) for v in files.values()))
        daemon.close()
        assert_each_exactly_once(
            {"processed": shm / "processed", "quarantine": shm / "q", "uploads": dirs["uploads"]},
            files,
        )
        assert not [p for p in (shm / "processed").rglob(".watcher-*")]
        assert all(
            (os.stat(shm / "q" / r["id"]).st_mode & 0o377) == 0 for r in quarantined(shm / "q")
        )
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)


def test_sigterm_stops_gracefully_with_exit_0(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    daemon = DaemonProcess(subprocess_env).start()
    (dirs["uploads"] / "x.txt").write_bytes(b"x")
    daemon.events.wait_for("file.clean")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=30) == 0
    daemon.events.wait_for("watcher.stopping")
    daemon.events.wait_for("watcher.stopped")


class ScriptedScanner:
    """The one faked seam: a scanner whose replies a test chooses."""

    def __init__(self, verdicts: list[Verdict], on_scan: Callable[[int], None] | None = None):
        self.verdicts = verdicts
        self.on_scan = on_scan
        self.calls = 0

    def scan_fd(self, fd: int) -> Verdict:
        self.calls += 1
        if self.on_scan:
            self.on_scan(fd)
        return self.verdicts.pop(0) if self.verdicts else Clean()

    def ping(self) -> None:
        return None

    def version(self) -> str:
        return "ClamAV scripted"


@pytest.mark.parametrize(
    "reply", [NotScanned("clamd error: x ERROR", True), NotScanned("empty reply", True)]
)
def test_errors_from_clamd_are_never_clean(
    make_settings: Callable[..., object], dirs: dict[str, Path], events: Events, reply: Verdict
) -> None:
    scanner = ScriptedScanner([reply] * 10)
    daemon = Service(make_settings(max_scan_attempts=3, retry_max_backoff_s=0.05), scanner)  # type: ignore[arg-type]
    daemon.start()
    try:
        (dirs["uploads"] / "e.txt").write_bytes(b"could be anything")
        (_record,) = events.wait_for("file.unscannable", path="e.txt")
        assert len(events.named("file.retry", path="e.txt")) == 2
        assert scanner.calls == 3
        assert files_under(dirs["processed"]) == {}
        (meta,) = quarantined(dirs["quarantine"])
        assert meta["verdict"] == "unscannable" and meta["reason"] == reply.reason  # type: ignore[union-attr]
    finally:
        daemon.close()


def test_a_writer_arriving_during_the_scan_cannot_change_what_is_delivered(
    make_settings: Callable[..., object], dirs: dict[str, Path], events: Events
) -> None:
    """Another process opens the claimed file for writing while clamd reads it: the lease we
    hold makes it wait, the daemon scans a private copy instead, and the writer's bytes land
    in an inode nobody delivers."""
    writers: list[subprocess.Popen[bytes]] = []

    def reopen_for_writing(fd: int) -> None:
        if scanner.calls != 1:
            return
        path = os.readlink(f"/proc/self/fd/{fd}")
        script = "import sys; open(sys.argv[1], 'ab').write(sys.argv[2].encode())"
        writers.append(subprocess.Popen([sys.executable, "-c", script, path, " EVIL"]))
        # The writer's open() has begun once our lease shows the break it asked for.
        wait_until(lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK, what="lease break")

    scanner = ScriptedScanner([], reopen_for_writing)
    daemon = Service(make_settings(), scanner)  # type: ignore[arg-type]
    daemon.start()
    try:
        (dirs["uploads"] / "grow.txt").write_bytes(b"start")
        events.wait_for("file.clean", path="grow.txt")
        assert scanner.calls == 2  # the original, then the private copy
        assert events.named("file.changed", path="grow.txt", reason="opened for writing")
        assert writers[0].wait(timeout=30) == 0  # let go of, it wrote into the orphaned inode
        assert files_under(dirs["processed"]) == {"grow.txt": b"start"}
    finally:
        daemon.close()


def test_claims_left_by_a_daemon_that_stopped_are_taken_over_without_a_restart(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    """A scaled-down second daemon leaves claims behind; the running one finishes them."""
    daemon = start_daemon()
    gone = Staging(dirs["uploads"] / ".watcher")
    gone.open()
    # Written under a name the running daemon ignores, so that the test claims it, not the daemon.
    (dirs["uploads"] / ".left.txt").write_bytes(b"waited in a stopped daemon's staging")
    uploads_fd = os.open(dirs["uploads"], os.O_RDONLY | os.O_DIRECTORY)
    assert gone.claim(uploads_fd, ".left.txt", "left.txt") is not None
    os.close(uploads_fd)
    gone.close()  # a clean stop with a claim still waiting (clamd was down, say)
    daemon.daemon.intake.request_sweep()
    events.wait_for("staging.adopted", path="left.txt")
    events.wait_for("file.clean", path="left.txt")
    assert files_under(dirs["processed"]) == {"left.txt": b"waited in a stopped daemon's staging"}
    assert not gone.dir.exists()


def test_a_lasting_filesystem_error_backs_off_instead_of_flooding_the_log(
    make_settings: Callable[..., object], dirs: dict[str, Path], events: Events
) -> None:
    class Failing(ScriptedScanner):
        def scan_fd(self, fd: int) -> Verdict:
            raise OSError(errno.EIO, "Input/output error")  # a disk fault: it may pass

    daemon = Service(make_settings(), Failing([]))  # type: ignore[arg-type]
    daemon.start()
    try:
        (dirs["uploads"] / "stuck.txt").write_bytes(b"cannot be read")
        retries = events.wait_for("file.retry", count=3, path="stuck.txt")
        assert [r["retry_in_s"] for r in retries] == [1.0, 2.0, 4.0]
        assert files_under(dirs["processed"]) == {} and quarantined(dirs["quarantine"]) == []
        assert staged(dirs["uploads"])  # held in staging, not lost
    finally:
        daemon.close()


def test_lost_inotify_events_are_swept_at_once(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    """The kernel's event queue overflows: intake sweeps then, not at its next interval."""
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    if not os.access(limit, os.W_OK):
        pytest.skip("needs root and a writable /proc/sys to shrink the inotify queue")
    saved = limit.read_text()
    limit.write_text("64\n")  # read at inotify_init: only the daemon started now gets it
    try:
        env = {**subprocess_env, "WATCHER_SWEEP_INTERVAL_S": "3600"}
        daemon = DaemonProcess(env).start()
    finally:
        limit.write_text(saved)
    assert daemon.proc is not None
    # Flat: files in a new directory would be found by that directory's own sweep.
    files = {name.replace("/", "-"): body for name, body in corpus(200, seed=11).items()}
    daemon.proc.send_signal(signal.SIGSTOP)  # reads nothing while far more than 64 events arrive
    try:
        drop(dirs["uploads"], files)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    daemon.events.wait_for("intake.events_lost")
    wait_until(
        lambda: delivered_count(dirs) >= len(files) and files_under(dirs["uploads"]) == {},
        60,
        "every file delivered although its events were lost",
    )
    assert daemon.terminate() == 0
    assert_each_exactly_once(dirs, files)
