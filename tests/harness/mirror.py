"""A signature mirror on 127.0.0.1 (python's http.server in a thread) and a freshclam for it."""

from __future__ import annotations

import http.server
import pwd
import secrets
import threading
from functools import partial
from pathlib import Path
from typing import Any


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class SignatureServer:
    """Serves the files in `root`; `publish` writes a custom body-signature database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        handler = partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def publish(self, name: str, signatures: dict[str, bytes]) -> None:
        """`Name:0:*:<hex>` lines: each name detects files containing its bytes."""
        body = "".join(f"{sig}:0:*:{marker.hex()}\n" for sig, marker in signatures.items())
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(self.root / name)

    def start(self) -> SignatureServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def freshclam_command(conf: Path, database_dir: Path, url: str) -> str:
    """Write a freshclam.conf that fetches only `url` into `database_dir`; return the command."""
    owner = pwd.getpwuid(database_dir.stat().st_uid).pw_name  # used when run as root
    conf.write_text(
        f"DatabaseDirectory {database_dir}\nDatabaseOwner {owner}\n"
        "ExcludeDatabase main\nExcludeDatabase daily\nExcludeDatabase bytecode\n"
        f"DatabaseMirror database.clamav.net\nDatabaseCustomURL {url}\n"
        "ConnectTimeout 5\nReceiveTimeout 10\nMaxAttempts 1\n"
    )
    return f"freshclam --config-file={conf} --no-dns --stdout"


def unique_marker() -> bytes:
    """Bytes no signature knows yet: `publish` one to make files containing it infected."""
    return b"WATCHER-LATE-MARKER-" + secrets.token_hex(8).encode()
