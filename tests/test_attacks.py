"""A hostile uploader against a real daemon, each attack a real process (tests/attacker.py).

The daemon runs as root, or unprivileged: uid 0 with every capability dropped (setpriv), so
it has no CAP_LEASE, CAP_DAC_OVERRIDE or CAP_FOWNER, like any other user, while it can still
run the interpreter the suite runs with. The attacker writes as the daemon's uid (root) or as
another one (nobody, 65534, with Debian's python3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR, ROOT
from harness.clamd import Clamd
from harness.daemon import DaemonProcess, daemon_env
from harness.events import wait_until
from harness.files import files_under, quarantined
from harness.http_client import get

ATTACKER = (Path(__file__).parent / "attacker.py").read_text()
NOBODY = 65534
UNPRIVILEGED = ("setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--")
AS = {"root": (), "unprivileged": UNPRIVILEGED}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attacks switch users: needs root")


@pytest.fixture
def arena(clamd_server: Clamd) -> Iterator[dict[str, Path]]:
    """Directories another user can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="watcher-attack-", dir="/tmp"))
    base.chmod(0o755)
    paths = {name: base / name for name in ("uploads", "processed", "quarantine", "state")}
    for path in paths.values():
        path.mkdir(mode=0o700)
    paths["uploads"].chmod(0o777)  # the uploader's to write
    paths["processed"].chmod(0o755)
    paths["private"] = base / "private"  # root's, 0700: nobody may read what is inside
    paths["private"].mkdir(mode=0o700)
    (paths["private"] / "secret.txt").write_bytes(b"root's secret")
    (paths["private"] / "secret.txt").chmod(0o644)
    yield paths
    subprocess.run(["rm", "-rf", str(base)], check=False)  # rmtree recurses: 1,000 levels fail


def start(arena: dict[str, Path], clamd: Clamd, user: str, **settings: str) -> DaemonProcess:
    env = daemon_env(
        arena,
        clamd,
        WATCHER_SETTLE_S="0.5",
        WATCHER_SWEEP_INTERVAL_S="2",
        WATCHER_LOG_LEVEL="DEBUG",  # intake.swept: the tests wait for sweeps
        WATCHER_UPDATE_COMMAND="",
        WATCHER_DEFINITIONS_DIR=str(clamd.db),
        WATCHER_HTTP_ADDR="127.0.0.1:0",
        PYTHONPATH=str(ROOT),
        **settings,
    )
    return DaemonProcess(env, prefix=AS[user]).start()


def attack(*args: str, uid: int = 0) -> subprocess.Popen[str]:
    """The attacker in its own process, as root or as `uid` (with Debian's python3)."""
    python = sys.executable if uid == 0 else "/usr/bin/python3"
    return subprocess.Popen(
        [python, "-c", ATTACKER, *args], stdout=subprocess.PIPE, text=True,
        user=uid, group=uid, extra_groups=[], cwd="/",
    )  # fmt: skip


def outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def verdict(daemon: DaemonProcess, rel: str) -> Any:
    (listening,) = daemon.events.wait_for("http.listening")
    # ?wait: the file.clean line is written just before the lookup learns the verdict
    return get((listening["host"], listening["port"]), f"/v1/files/{rel}?wait=5").json()


def test_a_writer_reopening_the_upload_cannot_change_it_once_delivered(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.1: the fd is taken between the daemon's writer check and its claim, kept,
    and written into once the file shows up in processed (5 of 5 tries on the old code)."""
    daemon = start(arena, clamd_server, "root")
    try:
        landed = 0
        for n in range(5):
            name = f"upload-{n}.txt"
            delivered = arena["processed"] / name
            result = outcome(
                attack("reopen", str(arena["uploads"]), name, str(delivered), EICAR.hex())
            )
            if not result["landed"]:
                continue  # the daemon claimed it before the attacker's open: try again
            landed += 1
            daemon.events.wait_for("file.clean", path=name)
            assert delivered.read_bytes() == b"clean bytes " * 100, f"round {n}"
            assert verdict(daemon, name)["state"] == "clean"
        assert landed, "the attacker never got its fd in: the test proved nothing"
    finally:
        assert daemon.terminate() == 0


def test_an_idle_writer_of_another_uid_cannot_change_it_once_delivered(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """The unprivileged daemon cannot lease another user's file (so cannot tell it is held
    open): it waits WATCHER_SETTLE_S, then must deliver bytes that writer can no longer reach."""
    daemon = start(arena, clamd_server, "unprivileged")
    try:
        delivered = arena["processed"] / "idle.txt"
        proc = attack(
            "hold", str(arena["uploads"]), "idle.txt", str(delivered), EICAR.hex(), uid=NOBODY
        )
        assert outcome(proc) == {"delivered": True}
        daemon.events.wait_for("file.clean", path="idle.txt")
        assert delivered.read_bytes() == b"clean bytes " * 100
        assert verdict(daemon, "idle.txt")["state"] == "clean"
    finally:
        assert daemon.terminate() == 0


@pytest.mark.parametrize("user", ["root", "unprivileged"])
def test_a_directory_swapped_for_a_symlink_leads_nowhere(
    arena: dict[str, Path], clamd_server: Clamd, user: str
) -> None:
    """Issue 11.2: d/secret.txt waits to settle; d becomes a symlink to a directory only the
    daemon may read. Nothing of it may move: every path is walked below the uploads root."""
    daemon = start(arena, clamd_server, user)
    try:
        proc = attack("swap", str(arena["uploads"]), str(arena["private"]), uid=NOBODY)
        assert outcome(proc) == {"swapped": True}
        daemon.events.wait_for("file.clean", path="d2/secret.txt")  # the attacker's own file
        run_sweep_and_wait(daemon)
        daemon.events.wait_for("file.rejected", path="d", reason="symlink")
        assert (arena["private"] / "secret.txt").read_bytes() == b"root's secret"
        assert files_under(arena["processed"]) == {"d2/secret.txt": b"decoy"}
        assert quarantined(arena["quarantine"]) == []
    finally:
        assert daemon.terminate() == 0


def run_sweep_and_wait(daemon: DaemonProcess) -> None:
    """A full sweep (SIGHUP is not ours to send): wait for the periodic one, kept short."""
    count = len(daemon.events.named("intake.swept"))
    daemon.events.wait_for("intake.swept", count=count + 1, timeout_s=30)


def test_a_planted_staging_symlink_is_moved_aside_and_never_followed(
    arena: dict[str, Path], clamd_server: Clamd, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (arena["uploads"] / ".watcher").symlink_to(target)
    daemon = start(arena, clamd_server, "root")
    try:
        (impostor,) = daemon.events.wait_for("staging.impostor")
        assert (arena["uploads"] / impostor["moved_to"]).is_symlink()
        assert (arena["uploads"] / ".watcher").is_dir()
        assert not (arena["uploads"] / ".watcher").is_symlink()
        assert list(target.iterdir()) == [] and target.stat().st_mode & 0o777 == 0o755
        (arena["uploads"] / "after.txt").write_bytes(b"still works")
        daemon.events.wait_for("file.clean", path="after.txt")
    finally:
        assert daemon.terminate() == 0


def _nest(root: Path, depth: int, leaf: bytes) -> str:
    """`depth` nested directories below root (by directory fds), a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    out = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, leaf)
    os.close(out)
    os.close(fd)
    return "/".join(["d"] * depth + ["leaf.txt"])


@pytest.mark.parametrize("when", ["before the start", "while running"])
def test_a_thousand_nested_directories_are_rejected_at_the_limit(
    arena: dict[str, Path], clamd_server: Clamd, when: str
) -> None:
    """Issue 11.3: ~1,000 nested directories raised RecursionError (at start: the daemon
    exited; while running: the inotify thread died while /healthz said alive)."""
    if when == "before the start":
        _nest(arena["uploads"], 1000, b"deep")
    daemon = start(arena, clamd_server, "root", WATCHER_MAX_DEPTH="8")
    try:
        if when == "while running":
            _nest(arena["uploads"], 1000, b"deep")
        (rejected,) = daemon.events.wait_for("file.rejected", timeout_s=30)
        assert rejected["path"] == "/".join(["d"] * 8) and "WATCHER_MAX_DEPTH" in rejected["reason"]
        (arena["uploads"] / "s1" / "s2").mkdir(parents=True)
        (arena["uploads"] / "s1" / "s2" / "leaf.txt").write_bytes(b"shallow")
        daemon.events.wait_for("file.clean", path="s1/s2/leaf.txt")
        (listening,) = daemon.events.wait_for("http.listening")
        assert get((listening["host"], listening["port"]), "/healthz").status == 200
        run_sweep_and_wait(daemon)
        assert len(daemon.events.named("file.rejected")) == 1  # once, not at every sweep
        assert daemon.proc is not None
        assert inotify_watches(daemon.proc.pid) == 8 + 2  # uploads, levels 1 to 7; s1, s1/s2
        assert files_under(arena["processed"]) == {"s1/s2/leaf.txt": b"shallow"}
    finally:
        assert daemon.terminate() == 0


def inotify_watches(pid: int) -> int:
    """How many directories a process watches (its inotify fds' fdinfo, one line a watch)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                count += sum(line.startswith("inotify wd:") for line in info)
        except FileNotFoundError:
            continue  # an fd closed while we looked (a scan's, a connection's)
    return count


def test_a_file_the_daemon_may_not_read_ends_unscannable_at_once(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.4: mode 000, another owner, an unprivileged daemon: EACCES retried forever."""
    daemon = start(arena, clamd_server, "unprivileged")
    try:
        locked = arena["uploads"] / "locked.bin"
        locked.write_bytes(b"nobody's")
        os.chown(locked, NOBODY, NOBODY)
        locked.chmod(0)
        (event,) = daemon.events.wait_for("file.unscannable", path="locked.bin")
        assert "Permission denied" in event["reason"] and event["action"] == "quarantined"
        (record,) = quarantined(arena["quarantine"])
        assert record["reason"] == event["reason"] and record["sha256"] is None
        assert not daemon.events.named("file.retry")
    finally:
        assert daemon.terminate() == 0


def test_another_users_file_is_delivered_by_an_unprivileged_daemon(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.4: under fs.protected_hardlinks a link to another user's file is EPERM."""
    daemon = start(arena, clamd_server, "unprivileged")
    try:
        theirs = arena["uploads"] / ".theirs.part"
        theirs.write_bytes(b"an upload by nobody")
        os.chown(theirs, NOBODY, NOBODY)
        theirs.rename(arena["uploads"] / "theirs.txt")
        daemon.events.wait_for("file.clean", path="theirs.txt")
        assert files_under(arena["processed"]) == {"theirs.txt": b"an upload by nobody"}
    finally:
        assert daemon.terminate() == 0


def test_a_directory_whose_name_is_taken_in_processed_gets_a_suffix(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.4: `coll` delivered as a file, then `coll/y.txt` uploaded: EEXIST forever."""
    daemon = start(arena, clamd_server, "root")
    try:
        (arena["uploads"] / "coll").write_bytes(b"a file")
        daemon.events.wait_for("file.clean", path="coll")
        (arena["uploads"] / "coll").mkdir()
        (arena["uploads"] / "coll" / "y.txt").write_bytes(b"inside")
        (clean,) = daemon.events.wait_for("file.clean", path="coll/y.txt")
        assert clean["dest"] == str(arena["processed"] / "coll (1)" / "y.txt")
        assert files_under(arena["processed"]) == {"coll": b"a file", "coll (1)/y.txt": b"inside"}
    finally:
        assert daemon.terminate() == 0


def test_a_path_longer_than_path_max_is_delivered(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.4: whole-path calls fail with ENAMETOOLONG past 4,096 bytes."""
    name = "n" * 250
    fd = os.open(arena["uploads"], os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(20):  # 20 x 251 bytes: past PATH_MAX
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    out = os.open(".long.part", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"far down")
    os.close(out)
    daemon = start(arena, clamd_server, "root")
    try:
        os.rename(".long.part", "long.txt", src_dir_fd=fd, dst_dir_fd=fd)
        rel = "/".join([name] * 20 + ["long.txt"])
        daemon.events.wait_for("file.clean", path=rel)
        assert read_beneath(arena["processed"], rel) == b"far down"
    finally:
        os.close(fd)
        assert daemon.terminate() == 0


def test_a_huge_sparse_file_is_refused_without_reading_it(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.6: 4 GiB of holes took 9 s of hashing before it was quarantined; 64 GiB
    would take minutes. The size decides before a byte is read, and no copy fills holes."""
    daemon = start(arena, clamd_server, "root", WATCHER_MAX_FILE_BYTES="1M")
    try:
        with open(arena["uploads"] / ".huge.part", "wb") as f:
            f.truncate(64 << 30)
            f.write(b"head")
        (arena["uploads"] / ".huge.part").rename(arena["uploads"] / "huge.bin")
        (event,) = daemon.events.wait_for("file.unscannable", path="huge.bin", timeout_s=20)
        assert "WATCHER_MAX_FILE_BYTES" in event["reason"] and event["sha256"] is None
        (record,) = quarantined_meta(arena["quarantine"])
        kept = arena["quarantine"] / record["id"]
        assert kept.stat().st_size == 64 << 30 and kept.stat().st_blocks * 512 < 1 << 20
    finally:
        assert daemon.terminate() == 0


def read_beneath(root: Path, rel: str) -> bytes:
    """A file's bytes by directory fds: its whole path may be longer than PATH_MAX."""
    *dirs, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in dirs:
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    data = os.open(name, os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    with os.fdopen(data, "rb") as f:
        return f.read()


def quarantined_meta(qdir: Path) -> list[dict[str, Any]]:
    """Quarantine records without reading their (huge) data."""
    return [json.loads(p.read_text()) for p in sorted(qdir.glob("*.json"))]


def test_a_flood_of_rejected_entries_is_reported_once_each(
    arena: dict[str, Path], clamd_server: Clamd
) -> None:
    """Issue 11.6: past 10,000 remembered rejections every sweep logged them all again."""
    for n in range(10_050):
        os.symlink("/etc/passwd", arena["uploads"] / f"link-{n}")
    daemon = start(arena, clamd_server, "root")
    try:
        wait_until(
            lambda: len(daemon.events.named("file.rejected")) >= 10_050, 60, "every link rejected"
        )
        for _ in range(2):
            run_sweep_and_wait(daemon)
        assert len(daemon.events.named("file.rejected")) == 10_050
        assert not daemon.events.named("raw")  # nothing but JSON lines
    finally:
        assert daemon.terminate() == 0
