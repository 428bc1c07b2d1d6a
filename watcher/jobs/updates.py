"""Definition updates: run freshclam (WATCHER_UPDATE_COMMAND), make clamd load the result, rescan.

One update: snapshot the database directory → run the command (split shell-style, never through
a shell, with a timeout) → if the definitions changed: RELOAD clamd, wait until the new engine
answers, rescan recent deliveries. clamd's RELOAD only starts a reload (scanning goes on with the
old engine meanwhile), so the new engine is recognised by a canary: before the RELOAD a one-line
signature for a fresh random token is written to ``<definitions dir>/watcher-canary.ndb``; once
clamd detects the token, everything in the directory is loaded. Without a writable directory,
a new daily version in VERSION is the sign.

The ClamAV mirrors rate-limit (about one check an hour): attempts are spaced by
WATCHER_UPDATE_INTERVAL, counted from the last attempt recorded in ``<state dir>/updates.json``
or freshclam's own ``freshclam.dat``, whichever is newer, so restarts never add checks; after
failures the spacing doubles, and a CDN refusal (403/429) waits at least a day.

What is left to do (reload, rescan) is recorded in the state file first, so a crash or restart
finishes it at the next tick. A flock on ``updates.lock`` keeps the daemon's job and a
`watcher update-definitions` run from overlapping.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from watcher.clamav import Scanner
from watcher.definitions import (
    CANARY_NAME,
    DefinitionsState,
    LoadedDefinitions,
    database_files,
    fingerprint,
)
from watcher.errors import ClamdUnavailable
from watcher.fsops import write_json_atomic
from watcher.jobs.rescan import Rescanner
from watcher.logs import emit
from watcher.verdict import Infected

# freshclam 1.x exits with libfreshclam's fc_error_t; its man page still lists the 0.x codes.
FRESHCLAM_CAUSES = {
    2: "init",
    3: "database_dir",
    4: "file",
    5: "network",
    6: "empty_file",
    7: "bad_database",
    8: "test_failed",
    9: "config",
    10: "database_dir_access",
    11: "download_failed",
    12: "mirrors_out_of_sync",
    13: "logging",
    14: "update_failed",
    15: "out_of_memory",
    16: "invalid_argument",
    17: "forbidden",
    18: "rate_limited",
    19: "error",
    40: "unknown_option",
    50: "database_dir",
    51: "checksum",
    52: "network",
    53: "unlink",
    54: "verification",
    55: "read",
    56: "config",
    57: "create_file",
    58: "download_failed",
    59: "mirrors_out_of_sync",
    60: "user",
    61: "privileges",
    62: "logging",
}
COOL_DOWN_CAUSES = {"rate_limited", "forbidden"}
COOL_DOWN_S = 24 * 3600.0
MAX_BACKOFF_S = 24 * 3600.0
OUTPUT_LINES = 10
_UPDATED = re.compile(r"^(?P<db>\S+) updated \(version: (?P<version>[^,]+), sigs: (?P<sigs>\d+)")
_NOTIFIED = "Clamd successfully notified"

Pending = Literal["reload", "rescan"]


class UpdateOutcome(enum.StrEnum):
    UPDATED = "updated"
    CURRENT = "current"
    FAILED = "failed"
    BUSY = "busy"  # another update holds the lock
    NOT_DUE = "not_due"


class ClamdControl(Scanner, Protocol):
    def reload(self) -> str: ...


# -- pure parts -------------------------------------------------------------------------


@dataclass
class UpdateState:
    """Persisted in ``updates.json``."""

    last_attempt_at: datetime | None = None
    last_success_at: datetime | None = None
    failures: int = 0
    last_cause: str | None = None
    pending: Pending | None = None


def next_attempt_at(
    state: UpdateState, interval_s: float, freshclam_ran_at: datetime | None
) -> datetime | None:
    """When the next check may run; None: at once (nothing was ever checked).

    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> next_attempt_at(UpdateState(last_attempt_at=t, failures=3), 3600, None) - t
    datetime.timedelta(seconds=14400)
    """
    known = [at for at in (state.last_attempt_at, freshclam_ran_at) if at is not None]
    if not known:
        return None
    delay = interval_s
    if state.failures:
        delay = min(interval_s * 2 ** (state.failures - 1), max(interval_s, MAX_BACKOFF_S))
    if state.last_cause in COOL_DOWN_CAUSES:
        delay = max(delay, COOL_DOWN_S)
    return max(known) + timedelta(seconds=delay)


def failure_cause(exit_code: int, output: list[str]) -> str:
    """Map freshclam's exit code (and its words about the CDN) to a stable cause."""
    text = "\n".join(output).lower()
    if "error code 429" in text or "cool-down" in text:
        return "rate_limited"
    if "error code 403" in text:
        return "forbidden"
    if exit_code < 0:
        return f"signal_{-exit_code}"
    return FRESHCLAM_CAUSES.get(exit_code, f"exit_{exit_code}")


def updated_databases(output: list[str]) -> dict[str, dict[str, Any]]:
    """``daily.cld updated (version: 27100, sigs: 2070000, …)`` → {"daily.cld": {...}}."""
    found: dict[str, dict[str, Any]] = {}
    for line in output:
        match = _UPDATED.match(line.strip())
        if match:
            found[match["db"]] = {"version": match["version"], "sigs": int(match["sigs"])}
    return found


# -- running the command ----------------------------------------------------------------


@dataclass
class CommandResult:
    exit_code: int
    output: list[str] = field(default_factory=list)
    cause: str | None = None  # None when it worked

    @property
    def ok(self) -> bool:
        return self.cause is None


def run_command(argv: list[str], timeout_s: float, stop: threading.Event) -> CommandResult:
    """Run without a shell; stdout and stderr together; stopped on timeout or shutdown."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except FileNotFoundError as err:
        return CommandResult(-1, [str(err)], "not_found")
    except PermissionError as err:
        return CommandResult(-1, [str(err)], "permission")
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    cause = None
    while True:
        try:
            out, _ = proc.communicate(timeout=0.2)
            chunks.append(out or b"")
            break
        except subprocess.TimeoutExpired:
            if stop.is_set() or time.monotonic() > deadline:
                cause = "interrupted" if stop.is_set() else "timeout"
                proc.terminate()
                try:
                    out, _ = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                chunks.append(out or b"")
                break
    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    code = proc.returncode
    if cause is None and code not in (0, 1):  # 1: FC_UPTODATE, where a build returns it
        cause = failure_cause(code, lines)
    return CommandResult(code, lines, cause)


# -- the update job ---------------------------------------------------------------------


class Updater:
    def __init__(
        self,
        argv: list[str],
        scanner: ClamdControl,
        definitions_dir: Path,
        state_dir: Path,
        definitions: DefinitionsState,
        rescanner: Rescanner,
        interval_s: float,
        timeout_s: float,
        stop: threading.Event,
        reload_timeout_s: float = 600.0,
        on_reloaded: Callable[[], None] | None = None,
    ) -> None:
        self.argv = argv
        self.scanner = scanner
        self.definitions_dir = definitions_dir
        self.state_path = state_dir / "updates.json"
        self._lock_path = state_dir / "updates.lock"
        self.definitions = definitions
        self.rescanner = rescanner
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stop = stop
        self.reload_timeout_s = reload_timeout_s
        self.on_reloaded = on_reloaded

    # -- entry points -------------------------------------------------------------------

    def tick(self, now: datetime) -> UpdateOutcome:
        """Scheduled: finish what a previous run left, then update if due."""
        with self._locked(wait=False) as held:
            if not held:
                return UpdateOutcome.BUSY
            state = self.load_state()
            due_at = next_attempt_at(state, self.interval_s, self._freshclam_ran_at())
            due = due_at is None or now >= due_at
            if due or state.last_cause != "reload_timeout":  # a slow reload waits its turn
                self._finish_pending(state, now)
            return self._update(state, now) if due else UpdateOutcome.NOT_DUE

    def update_now(self, now: datetime) -> UpdateOutcome:
        """`watcher update-definitions`: the same steps, now, waiting for a running update."""
        with self._locked(wait=True):
            state = self.load_state()
            self._finish_pending(state, now)
            return self._update(state, now)

    def rescan_if_idle(self, now: datetime) -> bool:
        """clamd's definitions changed under us (an outside freshclam): rescan, unless busy."""
        with self._locked(wait=False) as held:
            if not held:
                return False
            state = self.load_state()
            state.pending = "rescan"
            self._save(state)
            self._finish_pending(state, now)
            return True

    # -- steps --------------------------------------------------------------------------

    def _update(self, state: UpdateState, now: datetime) -> UpdateOutcome:
        before = fingerprint(self.definitions_dir)
        before_version = self._version_or_none()
        left_over = state.pending  # a reload that failed before still has to happen
        state.last_attempt_at = now
        state.pending = "reload"  # until we know nothing changed: a crash then reloads
        self._save(state)
        emit("definitions.update_started", command=self.argv)
        started = time.monotonic()
        result = run_command(self.argv, self.timeout_s, self.stop)
        databases = updated_databases(result.output)
        after = fingerprint(self.definitions_dir)
        changed = after != before or bool(databases) or (result.ok and not after)
        if result.ok:
            state.failures, state.last_cause, state.last_success_at = 0, None, now
        else:
            if result.cause != "interrupted":
                state.failures += 1
            state.last_cause = result.cause
            self._log_failure(state, result.cause or "", result)
        if not changed:
            state.pending = left_over
            self._save(state)
            if result.ok:
                self.definitions.record_update(now, None)
                emit(
                    "definitions.current",
                    clamd_version=before_version,
                    duration_s=round(time.monotonic() - started, 3),
                )
            return UpdateOutcome.CURRENT if result.ok else UpdateOutcome.FAILED
        self._save(state)
        notified = any(_NOTIFIED in line for line in result.output)
        loaded = self._reload(before_version, notified, databases, state)
        if loaded is not None:
            self._rescan(state, now)
        return UpdateOutcome.UPDATED if result.ok and loaded is not None else UpdateOutcome.FAILED

    def _finish_pending(self, state: UpdateState, now: datetime) -> None:
        if state.pending == "reload" and self._reload(None, False, {}, state) is None:
            return
        if state.pending == "rescan":
            self._rescan(state, now)

    def _reload(
        self,
        before: str | None,
        notified: bool,
        databases: dict[str, dict[str, Any]],
        state: UpdateState,
    ) -> LoadedDefinitions | None:
        try:
            version, confirmed = self._reload_clamd(before, notified)
        except (ClamdUnavailable, TimeoutError) as err:
            cause = "reload_timeout" if isinstance(err, TimeoutError) else "clamd_unavailable"
            cause = "interrupted" if self.stop.is_set() else cause
            if cause == "reload_timeout":  # clamd answers but won't load them: back off
                state.failures, state.last_cause = state.failures + 1, cause
                self._save(state)
            self._log_failure(state, cause, CommandResult(0, [str(err)], cause))
            return None
        loaded = LoadedDefinitions.parse(version)
        self.definitions.update(loaded)
        self.definitions.record_update(datetime.now(UTC), None)
        if self.on_reloaded is not None:
            self.on_reloaded()
        sigs = sum(db["sigs"] for db in databases.values()) if databases else None
        emit(
            "definitions.updated",
            clamd_version=version,
            version=loaded.version,
            built_at=loaded.built_at.isoformat() if loaded.built_at else None,
            sigs=sigs,
            databases=databases,
            reload_confirmed=confirmed,
            notified_by_freshclam=notified,
        )
        if not confirmed:
            emit("definitions.reload_unconfirmed", clamd_version=version)
        state.pending = "rescan"
        self._save(state)
        return loaded

    def _rescan(self, state: UpdateState, now: datetime) -> None:
        try:
            report = self.rescanner.run(now)
        except ClamdUnavailable as err:
            emit("rescan.postponed", reason=str(err))
            return
        if report.complete:
            state.pending = None
            self._save(state)

    def _reload_clamd(self, before: str | None, notified: bool) -> tuple[str, bool]:
        """RELOAD, then wait until the new engine answers: (VERSION, confirmed)."""
        canary = self._write_canary()
        if not notified:
            self.scanner.reload()
        before_official = before is not None and LoadedDefinitions.parse(before).official
        deadline = time.monotonic() + self.reload_timeout_s
        nudge_at = time.monotonic() + 15.0
        delay = 0.05
        while True:
            version = self.scanner.version()
            if canary is not None and self._detects(canary):
                return version, True
            if before_official and version != before:
                return version, True  # a new daily version is a new engine
            if canary is None and not before_official:
                self.scanner.ping()  # nothing tells the engines apart: answering must do
                return version, False
            now = time.monotonic()
            if now > deadline or self.stop.is_set():
                raise TimeoutError(
                    f"clamd did not load new definitions in {self.reload_timeout_s}s"
                )
            if now > nudge_at:  # a RELOAD that arrives during a reload is dropped: ask again
                self.scanner.reload()
                nudge_at = now + 15.0
            self.stop.wait(delay)
            delay = min(delay * 2, 1.0)

    def _write_canary(self) -> bytes | None:
        if not database_files(self.definitions_dir):
            return None  # not clamd's database directory: clamd would never load the canary
        token = f"WATCHER-RELOAD-CANARY-{secrets.token_hex(16)}".encode()
        line = f"Watcher.Reload.Canary:0:*:{token.hex()}\n".encode()
        try:  # via a hidden temp name: clamd never loads half a file
            write_json_atomic(self.definitions_dir / CANARY_NAME, line, mode=0o644)
        except OSError as err:
            emit("definitions.canary_unwritable", reason=str(err))
            return None
        return token

    def _detects(self, token: bytes) -> bool:
        fd = os.memfd_create("watcher-canary", os.MFD_CLOEXEC)
        try:
            os.write(fd, token)
            os.lseek(fd, 0, os.SEEK_SET)
            return isinstance(self.scanner.scan_fd(fd), Infected)
        finally:
            os.close(fd)

    # -- state --------------------------------------------------------------------------

    def load_state(self) -> UpdateState:
        try:
            body = json.loads(self.state_path.read_bytes())
            for key in ("last_attempt_at", "last_success_at"):
                body[key] = datetime.fromisoformat(body[key]) if body.get(key) else None
            return UpdateState(**body)
        except FileNotFoundError:
            return UpdateState()
        except (OSError, ValueError, TypeError) as err:
            emit("definitions.state_unreadable", reason=str(err))
            return UpdateState()

    def _save(self, state: UpdateState) -> None:
        body = {
            k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(state).items()
        }
        write_json_atomic(self.state_path, json.dumps(body, indent=1).encode())

    def _freshclam_ran_at(self) -> datetime | None:
        try:
            return datetime.fromtimestamp(
                (self.definitions_dir / "freshclam.dat").stat().st_mtime, UTC
            )
        except OSError:
            return None

    def _version_or_none(self) -> str | None:
        try:
            return self.scanner.version()
        except ClamdUnavailable:
            return None

    def _log_failure(self, state: UpdateState, cause: str, result: CommandResult) -> None:
        self.definitions.record_update(datetime.now(UTC), cause)
        due = next_attempt_at(state, self.interval_s, None)
        emit(
            "definitions.update_failed",
            cause=cause,
            exit_code=result.exit_code,
            output=[line[:300] for line in result.output[-OUTPUT_LINES:]],
            failures=state.failures,
            next_attempt_at=due.isoformat() if due else None,
        )

    @contextlib.contextmanager
    def _locked(self, wait: bool) -> Iterator[bool]:
        self.state_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
