"""``watcher healthcheck`` and ``watcher quarantine list|show|restore|delete``.

Output for people on stdout (names escaped: an uploaded name never reaches a terminal raw),
log events (`quarantine.restored`, `quarantine.deleted`) on stderr. Exit codes: healthcheck
0 healthy / 1 not; quarantine 0 done / 1 no such entry / 2 refused or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from watcher import healthcheck
from watcher.allowlist import Allowlist
from watcher.errors import EntryNotFound, QuarantineError
from watcher.quarantine import Entry, Quarantine
from watcher.settings import Settings

EXIT_OK, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2


def add_commands(commands: Any) -> None:
    commands.add_parser(
        "healthcheck", help="exit 0 if the daemon runs and clamd answers PING, else 1 (one line)"
    )
    quarantine = commands.add_parser("quarantine", help="list, show, restore or delete entries")
    actions = quarantine.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every entry, oldest first")
    listing.add_argument("--json", action="store_true", help="a JSON array of the metadata")
    actions.add_parser("show", help="one entry's metadata as JSON").add_argument("id")
    restore = actions.add_parser(
        "restore", help="a false positive: move it back under its original name, allowlist it"
    )
    restore.add_argument("id")
    restore.add_argument(
        "--to", type=Path, metavar="DIR", help="restore under DIR (default: the processed dir)"
    )
    actions.add_parser("delete", help="remove an entry's bytes and metadata").add_argument("id")


def run_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Normally reached through watcher.entry's short path; the same check either way."""
    ok, line = healthcheck.check(settings.state_dir)
    print(line, flush=True)
    return 0 if ok else 1


def run_quarantine(settings: Settings, args: argparse.Namespace) -> int:
    store = Quarantine(settings.quarantine_dir, Allowlist(settings.state_dir / "allowlist"))
    try:
        if args.action == "list":
            _list(store.entries(), args.json)
        elif args.action == "show":
            print(json.dumps(store.get(args.id).to_json(), indent=2))
        elif args.action == "restore":
            dest = store.restore(args.id, args.to or settings.processed_dir)
            print(f"restored {args.id} to {printable(str(dest))}; its sha256 is allowlisted")
        elif args.action == "delete":
            store.delete(args.id)
            print(f"deleted {args.id}")
    except EntryNotFound as err:
        print(f"watcher: {printable(str(err))}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except QuarantineError as err:
        print(f"watcher: {printable(str(err))}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _list(entries: list[Entry], as_json: bool) -> None:
    if as_json:
        print(json.dumps([e.to_json() for e in entries], indent=1))
        return
    print(f"{'ID':<28} {'VERDICT':<12} {'STATE':<12} {'SIZE':>10}  DETECTED / PATH / WHY")
    for e in entries:
        m = e.meta
        why = m.get("signature") or m.get("reason") or ""
        print(
            f"{e.id:<28} {m.get('verdict', '?'):<12} {e.state:<12} {m.get('size', '?'):>10}  "
            f"{m.get('detected_at', '?')}  {printable(str(m.get('original_path')))}  "
            f"{printable(str(why))}"
        )


def printable(text: str) -> str:
    """Escape control characters and undecodable bytes, so a hostile name can't drive a tty."""
    return "".join(
        ch if ch.isprintable() and not 0xDC80 <= ord(ch) <= 0xDCFF else ascii(ch)[1:-1]
        for ch in text
    )
