"""The `watcher` command's entry point: `healthcheck` without importing the daemon.

Docker runs the health check every 30 s; importing the daemon, pydantic and the clamd client
would cost most of a second on a busy machine, so that one command takes a short path.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["healthcheck"]:
        from watcher.healthcheck import main as healthcheck

        return healthcheck()
    from watcher.cli import main as cli

    return cli(argv)
