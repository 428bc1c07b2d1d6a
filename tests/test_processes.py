"""One `watcher run` on several cores (WATCHER_PROCESSES): scan processes share the uploads by
path, the first answers for all of them, a dead one comes back, and one SIGTERM stops all."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from harness import EICAR
from harness.clamd import Clamd
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.files import files_under, quarantined
from harness.http_client import get
from watcher.service import Service
from watcher.settings import Settings


def children(pid: int) -> list[int]:
    """A process's children (each thread's: a restart is spawned by the watching thread)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return sorted(found)


def metric(body: str, name: str) -> float:
    (line,) = [ln for ln in body.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[-1])


def test_three_scan_processes_share_the_work_and_answer_as_one(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    daemon = DaemonProcess({**subprocess_env, "WATCHER_PROCESSES": "3"}).start()
    assert daemon.proc is not None
    try:
        scan_processes = wait_until(lambda: len(children(daemon.pid)) == 2 and children(daemon.pid))
        clean = {f"batch/f{n:03}.txt": f"clean {n}".encode() for n in range(120)}
        (dirs["uploads"] / "batch").mkdir()
        for rel, data in clean.items():
            (dirs["uploads"] / rel).write_bytes(data)
        for n in range(6):
            (dirs["uploads"] / f"bad{n}.com").write_bytes(EICAR)
        daemon.events.wait_for("file.clean", count=120, timeout_s=60)
        daemon.events.wait_for("file.infected", count=6, timeout_s=30)
        assert files_under(dirs["processed"]) == clean
        assert sorted(r["original_path"] for r in quarantined(dirs["quarantine"])) == [
            f"bad{n}.com" for n in range(6)
        ]
        # The first process answers for files any process decided, and counts them all.
        addr = daemon.http_address
        for rel in ("batch/f000.txt", "batch/f057.txt", "batch/f119.txt", "bad3.com"):
            state = get(addr, f"/v1/files/{rel}?wait=10").json()["state"]
            assert state == ("infected" if rel.endswith(".com") else "clean"), rel
        body = get(addr, "/metrics").body.decode()
        assert metric(body, 'watcher_files_total{verdict="clean"}') == 120
        assert metric(body, 'watcher_files_total{verdict="infected"}') == 6

        os.kill(scan_processes[0], signal.SIGKILL)  # a scan process dies: it comes back
        daemon.events.wait_for("process.exited", timeout_s=10)
        wait_until(lambda: len(children(daemon.pid)) == 2, 20, "a new scan process")
        later = {f"later{n:02}.txt": f"later {n}".encode() for n in range(30)}
        for rel, data in later.items():
            (dirs["uploads"] / rel).write_bytes(data)
        daemon.events.wait_for("file.clean", count=150, timeout_s=60)
        assert files_under(dirs["processed"]) == {**clean, **later}
        assert get(addr, "/healthz").status == 200
    finally:
        assert daemon.terminate() == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in scan_processes)
    assert not [r for r in daemon.events.records if r.get("event") == "raw"]


def test_scan_processes_check_clamd_again_when_definitions_are_reloaded(
    make_settings: Callable[..., Settings], own_clamd: Clamd, events: Events
) -> None:
    """The update job runs in the first process; the others must hear of the reload, or they
    would trust a clamd that lost its signatures until their next periodic check (5 min)."""
    lose_eicar = f"rm {own_clamd.db / 'watcher-test.ndb'}"
    service = Service(
        make_settings(
            clamav_socket=own_clamd.socket, definitions_dir=own_clamd.db,
            update_command=lose_eicar, processes=2,
        )
    )  # fmt: skip
    service.start()
    try:
        wait_until(service.processes.reporting, 30, "the scan process to start")
        events.wait_for("clamd.trusted")
        assert service.processes.clamd_distrust() is None
        service.jobs.run_now("update-definitions")
        events.wait_for("clamd.untrusted", timeout_s=60)  # the first process's own check
        problem = wait_until(service.processes.clamd_distrust, 15, "the scan process's distrust")
        assert "canary eicar" in problem
    finally:
        service.close()
    assert not service.processes.alive()
