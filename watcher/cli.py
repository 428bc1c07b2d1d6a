"""The `watcher` command. Builds the settings once, here, and hands each command what it needs.

``watcher healthcheck`` (Docker runs it every 30 s) takes a short path that imports only the
standard library and watcher/heartbeat.py: the daemon, pydantic and the clamd client would cost
most of a second on a busy machine. Everything else is imported by the command that needs it.

Output for people goes to stdout with names escaped (an uploaded name never reaches a terminal
raw); log events go to stdout, or to stderr for `quarantine` and `healthcheck`, whose stdout is
for people. Exit codes: `scan` 0 clean,
1 infected, 2 errors (clamscan's convention); `healthcheck` 0 healthy, 1 not; `quarantine` 0
done, 1 no such entry, 2 refused or failed; anything else 0 or 2 (invalid configuration, a
taken port, a failed update).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from watcher import __version__

if TYPE_CHECKING:
    from watcher.clamav import Scanner
    from watcher.quarantine import Entry
    from watcher.settings import Settings
    from watcher.verdict import Verdict

EXIT_CLEAN, EXIT_INFECTED, EXIT_ERROR = 0, 1, 2
EXIT_NOT_FOUND = 1

Command = Callable[["Settings", argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["healthcheck"]:
        from watcher import heartbeat

        return heartbeat.main()
    return _main(args)


def _main(argv: list[str]) -> int:
    from watcher.errors import ConfigError, WatcherError
    from watcher.logs import configure_logging
    from watcher.settings import load_settings

    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as err:
        print(f"watcher: {err}", file=sys.stderr)
        return 1 if args.command == "healthcheck" else EXIT_ERROR  # Docker reserves 2
    # Commands whose stdout is for people log to stderr; the others are logs on stdout.
    log_stream = sys.stderr if args.command in ("quarantine", "healthcheck") else None
    configure_logging(settings.log_format, settings.log_level, log_stream)
    command: Command = {
        "run": _run,
        "scan": _scan,
        "healthcheck": _healthcheck,
        "quarantine": _quarantine,
        "update-definitions": _update_definitions,
        "purge-quarantine": _purge_quarantine,
    }[args.command]
    try:
        return command(settings, args)
    except WatcherError as err:  # e.g. WATCHER_HTTP_ADDR already in use
        print(f"watcher: {printable(str(err))}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watcher",
        description="Scan uploads with clamd; deliver clean files, quarantine the rest.",
    )
    parser.add_argument("--version", action="version", version=f"watcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon (configuration from the environment)")
    run.add_argument("--partition", help=argparse.SUPPRESS)  # I/N: a scan process (processes.py)
    scan = commands.add_parser(
        "scan", help="scan files or directories once; exit 0 clean, 1 infected, 2 errors"
    )
    scan.add_argument("paths", nargs="+", type=Path)
    commands.add_parser(
        "update-definitions",
        help="run the definitions update once (update command, RELOAD, rescan); exit 0, 2 failed",
    )
    purge = commands.add_parser("purge-quarantine", help="apply quarantine retention once")
    purge.add_argument("--dry-run", action="store_true", help="only list what would go")
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
    return parser


# -- the commands ---------------------------------------------------------------------------


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.partition:
        from watcher.daemon import Partition
        from watcher.processes import run_scan_process

        index, _, count = args.partition.partition("/")
        return run_scan_process(settings, Partition(int(index), int(count)))
    from watcher.service import Service

    return Service(settings).run()


def _update_definitions(settings: Settings, args: argparse.Namespace) -> int:
    from watcher.clamav import scanner_from_settings
    from watcher.jobs import update_definitions_once

    return update_definitions_once(settings, scanner_from_settings(settings))


def _purge_quarantine(settings: Settings, args: argparse.Namespace) -> int:
    from watcher.jobs import purge_quarantine_once

    return purge_quarantine_once(settings, args.dry_run)


def _healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Reached when `main`'s short path was not taken (e.g. with WATCHER_CONFIG checked)."""
    from watcher import heartbeat

    ok, line = heartbeat.check(settings.state_dir)
    print(line, flush=True)
    return 0 if ok else 1


def _quarantine(settings: Settings, args: argparse.Namespace) -> int:
    from watcher.allowlist import Allowlist
    from watcher.errors import EntryNotFound, QuarantineError
    from watcher.quarantine import Quarantine

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
        return EXIT_ERROR
    return EXIT_CLEAN


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


def _scan(settings: Settings, args: argparse.Namespace) -> int:
    """Report a verdict per file, like clamdscan; nothing is moved."""
    from watcher.archives import look_inside_from_settings
    from watcher.clamav import scanner_from_settings

    scanner = scanner_from_settings(settings)
    look_inside = look_inside_from_settings(settings, scanner)  # what clamd cannot see: archives
    worst = EXIT_CLEAN
    progress = sys.stderr.isatty()
    for n, path in enumerate(_files(args.paths), 1):
        line, code = _scan_one(scanner, path, settings.max_file_bytes, look_inside)
        worst = max(worst, code)
        if progress:
            print(f"\r\x1b[K[{n}]", end="", file=sys.stderr, flush=True)
        print(f"{os.fsencode(path)!r}"[2:-1] + f": {line}", flush=True)
    if progress:
        print(file=sys.stderr)
    return worst


def _files(paths: list[Path]) -> Iterator[Path]:
    """Files below each path, sorted, never through a symlink and without recursion."""
    for top in paths:
        if not (top.is_dir() and not top.is_symlink()):
            yield top
            continue
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError:
                yield directory  # unreadable: reported as an error
                continue
            subdirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
            yield from (Path(e.path) for e in entries if not e.is_dir(follow_symlinks=False))
            stack.extend(reversed(subdirs))


def _scan_one(
    scanner: Scanner,
    path: Path,
    max_bytes: int,
    look_inside: Callable[[int, Verdict], Verdict],
) -> tuple[str, int]:
    from watcher.errors import ClamdUnavailable
    from watcher.fsops import OPEN_UPLOAD_FLAGS
    from watcher.verdict import Clean, Infected, NotScanned

    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            return "not a regular file (not read) ERROR", EXIT_ERROR
        if st.st_size > max_bytes:
            return f"larger than WATCHER_MAX_FILE_BYTES ({max_bytes}) ERROR", EXIT_ERROR
        fd = os.open(path, OPEN_UPLOAD_FLAGS)
    except OSError as err:
        return f"{err.strerror} ERROR", EXIT_ERROR
    try:
        verdict = look_inside(fd, scanner.scan_fd(fd))
    except ClamdUnavailable as err:
        verdict = NotScanned(str(err), transient=True)
    finally:
        os.close(fd)
    if isinstance(verdict, Clean):
        return "OK", EXIT_CLEAN
    if isinstance(verdict, Infected):
        return f"{verdict.signature} FOUND", EXIT_INFECTED
    return f"{verdict.reason} ERROR", EXIT_ERROR


def printable(text: str) -> str:
    """Escape control characters and undecodable bytes, so a hostile name can't drive a tty."""
    return "".join(
        ch if ch.isprintable() and not 0xDC80 <= ord(ch) <= 0xDCFF else ascii(ch)[1:-1]
        for ch in text
    )
