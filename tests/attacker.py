"""A hostile uploader, as its own process (standard library only: it may run as another user
under Debian's python3). Prints one JSON line saying what it managed, then exits.

  reopen UPLOADS NAME DELIVERED PAYLOAD_HEX
      write NAME (renamed into place), and the moment the daemon's writer check closes its
      read-only fd (IN_CLOSE_NOWRITE), open it again for writing; once DELIVERED exists,
      write PAYLOAD into the fd kept from before.
  hold UPLOADS NAME DELIVERED PAYLOAD_HEX
      write NAME and keep it open for writing, idle; once DELIVERED exists, write PAYLOAD.
  swap UPLOADS PRIVATE_DIR
      write d/secret.txt and keep it open; once the daemon has looked at it, rename d away,
      put a symlink d -> PRIVATE_DIR in its place, and close the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import time

IN_CLOSE_NOWRITE = 0x10
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class Watch:
    """inotify on one file, for the daemon's read-only open and close of it."""

    def __init__(self, path: str, mask: int = IN_CLOSE_NOWRITE) -> None:
        self.fd = _libc.inotify_init1(os.O_CLOEXEC)
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def wait(self) -> None:
        data = os.read(self.fd, 4096)
        assert struct.unpack_from("iIII", data)[1] & IN_CLOSE_NOWRITE


def wait_for(path: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.001)
    return False


def reopen(uploads: str, name: str, delivered: str, payload: bytes) -> dict[str, object]:
    path = os.path.join(uploads, name)
    part = os.path.join(uploads, f".{name}.part")  # a name the daemon ignores, until renamed
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"clean bytes " * 100)
    os.close(fd)
    watch = Watch(part)  # follows the file through the rename
    os.rename(part, path)
    watch.wait()  # the daemon's writer check just closed the file
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return {"landed": False}  # the daemon claimed it first this time
    if not wait_for(delivered, 30):
        return {"landed": True, "delivered": False}
    os.pwrite(fd, payload, 0)
    os.close(fd)
    return {"landed": True, "delivered": True}


def hold(uploads: str, name: str, delivered: str, payload: bytes) -> dict[str, object]:
    fd = os.open(os.path.join(uploads, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.fchmod(fd, 0o666)  # anyone may read and write it: even a hard link to it is allowed
    os.write(fd, b"clean bytes " * 100)
    if not wait_for(delivered, 30):
        return {"delivered": False}
    os.pwrite(fd, payload, 0)
    os.close(fd)
    return {"delivered": True}


def swap(uploads: str, private_dir: str) -> dict[str, object]:
    directory = os.path.join(uploads, "d")
    os.mkdir(directory)
    os.chmod(directory, 0o777)  # the daemon may take files out of it
    path = os.path.join(directory, "secret.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"decoy")
    Watch(path).wait()  # the daemon checked d/secret.txt: it now waits for it to settle
    os.rename(directory, os.path.join(uploads, "d2"))
    os.symlink(private_dir, directory)
    os.close(fd)
    return {"swapped": True}


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode in ("reopen", "hold"):
        uploads, name, delivered, payload = args
        act = reopen if mode == "reopen" else hold
        result = act(uploads, name, delivered, bytes.fromhex(payload))
    else:
        result = swap(*args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
