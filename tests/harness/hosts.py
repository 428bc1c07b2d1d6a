"""Hosts simulated on this machine: each a network and a mount namespace of its own (root only).

A `Host` is a holder process in new namespaces (`unshare --net --mount --uts`: a host name
of its own); every program of the host enters them (`nsenter`). Inside, `view` (the same path
on every host, so every replica has the same configuration) is a tmpfs of the host's own:

- ``<view>/private``: the host's clamd socket and the daemon's state directory, which no
  other host can reach (a unix socket is found by path, in the host's own mounts);
- ``<view>/data``: the shared tree, bind-mounted (`"bind"`: one kernel, so flock is shared,
  as on NFS with working locks), or seen through a FUSE mount of the host's own (`"fuse"`,
  bindfs without lock forwarding: each host's locks are its own, as on NFS mounted
  `nolock`; and attributes are cached for a second, as NFS caches them).

The test itself plays the file server: it sees the shared tree directly, and a host's
private files through ``/proc/<holder>/root``. Network: loopback only, up, per host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Literal

from harness.clamd import Clamd

View = Literal["bind", "fuse"]


def missing_tools() -> list[str]:
    """What the simulation needs and this machine lacks (it runs as root, with these)."""
    missing = [t for t in ("unshare", "nsenter", "ip", "bindfs", "fusermount") if not _which(t)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")


class Host:
    """One simulated host: `start()` it, run programs under `prefix`, `stop()` it."""

    def __init__(self, name: str, shared: Path, view: Path, kind: View = "bind") -> None:
        self.name = name
        self.shared = shared  # the tree every host mounts
        self.view = view  # where each host sees its own tmpfs (an empty directory here)
        self.kind = kind
        self._holder: subprocess.Popen[bytes] | None = None
        self._fuse: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._holder is not None, "not started"
        return self._holder.pid

    @property
    def prefix(self) -> tuple[str, ...]:
        """A command under this prefix runs in the host (nsenter execs it: same pid)."""
        return ("nsenter", f"--target={self.pid}", "--net", "--mount", "--uts", "--")

    @property
    def data(self) -> Path:
        """The shared tree, as the host's programs name it."""
        return self.view / "data"

    @property
    def private(self) -> Path:
        """The host's own directory, as its programs name it."""
        return self.view / "private"

    def reach(self, path: Path) -> Path:
        """A path of the host's own mounts, as this (the test's) process reaches it."""
        return Path(f"/proc/{self.pid}/root{path}")

    def start(self) -> Host:
        self.view.mkdir(parents=True, exist_ok=True)
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
                "sleep",
                "1d",
            ]
        )
        self._wait_for_namespaces()
        self.run("hostname", self.name)  # a host of its own: watcher's leases name their host
        self.run("ip", "link", "set", "lo", "up")
        self.run("mount", "-t", "tmpfs", "-o", "mode=0755", f"{self.name}-view", str(self.view))
        os.mkdir(self.reach(self.private), 0o700)
        os.mkdir(self.reach(self.data), 0o755)
        if self.kind == "bind":
            self.run("mount", "--bind", str(self.shared), str(self.data))
        else:
            # -f: in the foreground, so that we stop it; no lock forwarding (bindfs' default).
            self._fuse = subprocess.Popen(
                [*self.prefix, "bindfs", "-f", str(self.shared), str(self.data)]
            )
            self._wait_for_mount()
        return self

    def run(self, *argv: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        """One command in the host, checked."""
        return subprocess.run(
            [*self.prefix, *argv], check=True, capture_output=True, text=True, timeout=timeout_s
        )

    def clamd(self, root: Path, *, max_threads: int = 4, disable_cache: bool = False) -> Clamd:
        """A clamd of this host's own: its files under `root` (here), its socket private."""
        local = self.private / f"{root.name}.sock"
        return Clamd(
            root,
            max_threads,
            disable_cache=disable_cache,
            prefix=self.prefix,
            socket=self.reach(local),
            local_socket=local,
        )

    def stop(self) -> None:
        if self._fuse is not None and self._fuse.poll() is None:
            subprocess.run([*self.prefix, "fusermount", "-u", "-z", str(self.data)], check=False)
            self._fuse.terminate()
            self._fuse.wait(timeout=30)
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait(timeout=30)

    def _wait_for_namespaces(self) -> None:
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/net") != own:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"host {self.name}: unshare did not start")

    def _wait_for_mount(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run([*self.prefix, "mountpoint", "-q", str(self.data)], check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name}: bindfs did not mount {self.data}")
