"""Command line: ``watcher run``, ``watcher scan PATH...``. Builds the settings once, here."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from watcher import __version__, opscli
from watcher.archives import inspector_from_settings
from watcher.daemon import Daemon, scanner_from_settings
from watcher.errors import ClamdUnavailable, ConfigError, WatcherError
from watcher.fsops import OPEN_UPLOAD_FLAGS
from watcher.jobs import purge_quarantine_once, update_definitions_once
from watcher.logs import configure_logging
from watcher.settings import Settings, load_settings
from watcher.verdict import Clean, Infected, NotScanned, Verdict

EXIT_CLEAN, EXIT_INFECTED, EXIT_ERROR = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as err:
        print(f"watcher: {err}", file=sys.stderr)
        return 1 if args.command == "healthcheck" else EXIT_ERROR  # Docker reserves 2
    log_stream = sys.stderr if args.command in ("quarantine", "healthcheck") else None
    configure_logging(settings.log_format, settings.log_level, log_stream)
    handler = {
        "run": _run,
        "scan": _scan,
        "healthcheck": opscli.run_healthcheck,
        "quarantine": opscli.run_quarantine,
        "update-definitions": _update_definitions,
        "purge-quarantine": _purge_quarantine,
    }[args.command]
    try:
        return handler(settings, args)
    except WatcherError as err:  # e.g. WATCHER_HTTP_ADDR already in use
        print(f"watcher: {err}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watcher",
        description="Scan uploads with clamd; deliver clean files, quarantine the rest.",
    )
    parser.add_argument("--version", action="version", version=f"watcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the daemon (configuration from the environment)")
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
    opscli.add_commands(commands)
    return parser


def _run(settings: Settings, args: argparse.Namespace) -> int:
    return Daemon(settings).run()


def _update_definitions(settings: Settings, args: argparse.Namespace) -> int:
    return update_definitions_once(settings, scanner_from_settings(settings))


def _purge_quarantine(settings: Settings, args: argparse.Namespace) -> int:
    return purge_quarantine_once(settings, args.dry_run)


def _scan(settings: Settings, args: argparse.Namespace) -> int:
    """Report a verdict per file, like clamdscan; nothing is moved."""
    scanner = scanner_from_settings(settings)
    inspector = inspector_from_settings(settings, scanner)  # what clamd cannot see: archives
    look_inside = inspector.check if inspector else lambda fd, verdict: verdict
    files = list(_files(args.paths))
    worst = EXIT_CLEAN
    progress = sys.stderr.isatty()
    for n, path in enumerate(files, 1):
        line, code = _scan_one(scanner, path, settings.max_file_bytes, look_inside)
        worst = max(worst, code)
        if progress:
            print(f"\r\x1b[K[{n}/{len(files)}]", end="", file=sys.stderr, flush=True)
        print(f"{os.fsencode(path)!r}"[2:-1] + f": {line}", flush=True)
    if progress:
        print(file=sys.stderr)
    return worst


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for root, dirs, names in os.walk(path):  # os.walk does not follow symlinks
                dirs.sort()
                yield from (Path(root) / name for name in sorted(names))
        else:
            yield path


def _scan_one(
    scanner: object, path: Path, max_bytes: int, look_inside: Callable[[int, Verdict], Verdict]
) -> tuple[str, int]:
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
        verdict: Verdict = look_inside(fd, scanner.scan_fd(fd))  # type: ignore[attr-defined]
    except ClamdUnavailable as err:
        verdict = NotScanned(str(err), transient=True)
    finally:
        os.close(fd)
    if isinstance(verdict, Clean):
        return "OK", EXIT_CLEAN
    if isinstance(verdict, Infected):
        return f"{verdict.signature} FOUND", EXIT_INFECTED
    return f"{verdict.reason} ERROR", EXIT_ERROR
