"""`watcher run` stops on SIGTERM whichever of its threads the kernel hands the signal to."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

from harness.daemon import DaemonProcess
from harness.events import wait_until

_SYS_TGKILL = 234  # x86-64
_SYS_FUTEX = 202


def test_sigterm_delivered_to_another_thread_still_stops_the_daemon(
    dirs: dict[str, Path], subprocess_env: dict[str, str]
) -> None:
    """A process-directed signal may land on any thread that does not block it; Python runs
    its handler on the main thread only once that thread wakes."""
    daemon = DaemonProcess(subprocess_env).start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    daemon.events.wait_for("http.listening")  # the last step of the start, then it waits

    def main_thread_waits() -> bool:  # blocked in a lock (futex), not running bytecode
        with open(f"/proc/{pid}/task/{pid}/syscall") as f:
            return f.read().split()[0] == str(_SYS_FUTEX)

    wait_until(main_thread_waits, 10, "the main thread to wait for a stop")
    other = next(int(t) for t in sorted(os.listdir(f"/proc/{pid}/task")) if int(t) != pid)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_SYS_TGKILL, pid, other, signal.SIGTERM) == 0
    assert daemon.proc.wait(timeout=15) == 0
    daemon.events.wait_for("watcher.stopped")
