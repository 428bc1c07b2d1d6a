"""Hashes an operator has vouched for: a restored false positive is not quarantined again.

One small JSON file per sha256 in ``<state_dir>/allowlist/``, so the CLI (another process) can
add an entry while the daemon runs, and the daemon sees it on the next file without reloading.
Only consulted for an infected verdict, never for a file that could not be scanned.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from watcher.fsops import fsync_dir, write_json_atomic

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Allowlist:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def contains(self, sha256: str) -> bool:
        return bool(_SHA256.match(sha256)) and (self.directory / sha256).is_file()

    def add(self, sha256: str, **info: Any) -> None:
        """Record `sha256` with why it was allowed (e.g. the quarantine id it came from)."""
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(self.directory / sha256, json.dumps({"sha256": sha256, **info}).encode())
        fsync_dir(self.directory)

    def remove(self, sha256: str) -> bool:
        if not _SHA256.match(sha256):
            return False
        try:
            os.unlink(self.directory / sha256)
        except FileNotFoundError:
            return False
        return True

    def entries(self) -> list[dict[str, Any]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.iterdir()):
            if _SHA256.match(path.name):
                try:
                    found.append(json.loads(path.read_bytes()))
                except (OSError, ValueError):
                    found.append({"sha256": path.name})
        return found
