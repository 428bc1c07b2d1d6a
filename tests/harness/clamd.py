"""A real clamd for a test or a bench run: its own config, socket, database and log under `root`.

The database is watcher's test signatures (watcher/testsigs), which detect EICAR and ClamAV's test
files. Readiness is a PING over the socket, spoken here directly, so the harness never trusts the
client it is used to test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import TESTSIGS
from harness.net import free_port

if TYPE_CHECKING:
    from watcher.clamav import ClamdScanner

# Debian installs clamd in /usr/sbin, which a user's PATH often lacks.
_SBIN = f"{os.pathsep}/usr/sbin{os.pathsep}/sbin"


def clamd_binary() -> str | None:
    """Where clamd is installed (PATH, then the sbin directories), or None."""
    return shutil.which("clamd", path=os.environ.get("PATH", os.defpath) + _SBIN)


class Clamd:
    """clamd as configured for watcher's tests: stock settings, but ``AlertExceedsMax yes``
    (without it: the official image's), ``MaxThreads 4``. The switches are for the cases that
    need another clamd: benchmarks (``disable_cache``: clamd caches clean results by hash, a
    benchmark would measure nothing), a full queue (``max_queue``), encrypted archives flagged
    by clamd itself (``alert_encrypted``), TCP besides the unix socket (``tcp_host``, e.g.
    ``127.0.0.2``: each loopback address a host); anything else goes into ``extra_conf``.
    On a simulated host (harness.hosts), ``prefix`` runs clamd there, ``local_socket`` is its
    socket as clamd names it and ``socket`` the way the test reaches it."""

    def __init__(
        self,
        root: Path,
        max_threads: int = 4,
        extra_conf: str = "",
        alert_exceeds_max: bool = True,
        *,
        alert_encrypted: bool = False,
        disable_cache: bool = False,
        max_queue: int | None = None,
        tcp_host: str | None = None,
        prefix: tuple[str, ...] = (),
        socket: Path | None = None,
        local_socket: Path | None = None,
    ) -> None:
        self.tcp = (tcp_host, free_port(tcp_host)) if tcp_host else None
        if self.tcp is not None:
            extra_conf += f"TCPSocket {self.tcp[1]}\nTCPAddr {self.tcp[0]}\n"
        self.root = root
        self.socket = socket or root / "clamd.sock"
        self.local_socket = local_socket or self.socket
        self.prefix = prefix
        self.db = root / "db"
        self.conf = root / "clamd.conf"
        self.db.mkdir(parents=True, exist_ok=True)
        for sig in TESTSIGS.iterdir():
            shutil.copy(sig, self.db / sig.name)
        (root / "tmp").mkdir(exist_ok=True)
        switches = {
            "AlertExceedsMax yes": alert_exceeds_max,
            "AlertEncrypted yes": alert_encrypted,
            "DisableCache yes": disable_cache,
            f"MaxQueue {max_queue}": max_queue is not None,
        }
        self.conf.write_text(
            f"LocalSocket {self.local_socket}\nDatabaseDirectory {self.db}\nForeground yes\n"
            f"LogFile {root / 'clamd.log'}\nTemporaryDirectory {root / 'tmp'}\n"
            f"MaxThreads {max_threads}\nSelfCheck 3600\n"
            + "".join(f"{line}\n" for line, on in switches.items() if on)
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of its TCP socket."""
        assert self.tcp is not None
        return f"{self.tcp[0]}:{self.tcp[1]}"

    @property
    def scanner(self) -> ClamdScanner:
        """watcher's own client for this clamd."""
        from watcher.clamav import ClamdScanner

        return ClamdScanner(socket_path=self.socket, scan_timeout_s=30, connect_timeout_s=2)

    def start(self, timeout_s: float = 60) -> Clamd:
        binary = clamd_binary()
        if binary is None:
            raise FileNotFoundError("clamd is not installed (make install)")
        self.proc = subprocess.Popen(
            [*self.prefix, binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited with {self.proc.returncode}; see {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clamd did not answer PING within {timeout_s}s")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self, command: bytes, timeout_s: float = 2.0) -> bytes:
        """One ``z``-framed command on a connection of its own; clamd's reply without its NUL."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.socket))
            sock.sendall(b"z" + command + b"\0")
            reply = b""
            while not reply.endswith(b"\0") and (chunk := sock.recv(4096)):
                reply += chunk
        return reply.rstrip(b"\0")

    def answers(self) -> bool:
        try:
            return self.command(b"PING") == b"PONG"
        except OSError:
            return False

    def version(self) -> str:
        """What clamd says it runs, e.g. ``ClamAV 1.4.6``."""
        return self.command(b"VERSION").decode()

    def signature_count(self) -> int:
        return sum(len(p.read_text().splitlines()) for p in self.db.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # seen with clients waiting in its full backlog
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.socket.unlink(missing_ok=True)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
