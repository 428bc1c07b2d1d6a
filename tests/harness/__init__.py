"""The harness that tests/ and bench/ share: real programs, started and watched the same way.

- `harness.clamd`: `Clamd`, a real clamd with its own config, socket and test signatures.
- `harness.daemon`: `DaemonProcess` (`watcher run` as a subprocess, its JSON lines parsed),
  `run_cli` (one `python -m watcher` command), `daemon_env` (the settings naming its places).
- `harness.events`: `Events` (log records a test waits for), `loguru_events`, `wait_until`.
- `harness.files`: where files ended (processed, quarantine records, staging) and files planted.
- `harness.http_client`: real HTTP requests to the API, raw sockets and a slowloris.
- `harness.mirror`: a signature mirror on 127.0.0.1 and a freshclam for it.
- `harness.postgres`: `Postgres`, a real PostgreSQL (Debian's) on a private unix socket.
- `harness.proc`: CPU and memory of a process, from /proc.

bench/ imports it through bench/benchlib.py, the one place that puts tests/ on its sys.path (the
harness is test code: it stays out of the installed package and the image). Importing any of it
starts nothing and imports nothing of watcher's until a function needs it.
"""

from __future__ import annotations

import base64
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTSIGS = ROOT / "watcher" / "testsigs"
TESTFILES = Path("/usr/share/clamav-testfiles")  # Debian's clamav-testfiles
# Assembled at run time so no file in the repository is itself EICAR.
EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
