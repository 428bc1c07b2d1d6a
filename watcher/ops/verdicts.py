"""The verdict lookup: what became of the file the app uploaded as <relative path>.

States (`State`): ``pending`` while the file waits in uploads or is being scanned, then one
final state: ``clean`` (also for an allowlisted file, with ``allowlisted: true``),
``infected``, ``unscannable``, ``rejected`` (symlink, not a regular file, several hard links),
``unscanned`` (delivered with scanning switched off); ``unknown`` when there is no record
(never seen; without the verdict store also: decided before a restart, or more than `capacity`
files ago).

The verdict store (watcher/store/) is the memory that outlives the process and other daemons
on the same state directory; the last `capacity` verdicts are also kept here, so that a
verdict is answered the moment it is reached, before the committer has stored it. Of the two,
the newer answers (a late detection in the store is newer than the clean verdict kept here).

Waiting is the HTTP server's (watcher/httpserver.py): it `watch`es a path and looks it up again
each time `record` (a daemon listener) wakes it, for that path only; no polling, no thread per
waiter.

A file being scanned is in no directory the app knows: it is found through the staging
journals (`ClaimIndex`), which are append-only, so each of their bytes is read once.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from watcher.claims import claim_data, journal_segments, parse_journal
from watcher.errors import StoreUnavailable
from watcher.fsops import relative_to
from watcher.pipeline import Result, _refusal
from watcher.store import VerdictRecord, VerdictStore
from watcher.verdict import Outcome

State = Literal["pending", "clean", "infected", "unscannable", "rejected", "unscanned", "unknown"]
FINAL_STATES: frozenset[str] = frozenset(
    {"clean", "infected", "unscannable", "rejected", "unscanned"}
)


def state_of(outcome: Outcome) -> State | None:
    """The API state of a settled outcome: its verdict word, but for an allowlisted file,
    which the app may use like a clean one (it says so in `allowlisted: true`)."""
    word = outcome.verdict_word
    if word is None:
        return None
    return cast(State, "clean" if outcome is Outcome.ALLOWLISTED else word)


@dataclass(frozen=True, slots=True)  # up to WATCHER_VERDICT_MEMORY of these are kept
class FileStatus:
    path: str
    state: State
    location: str | None = None  # "processed/<path>", "quarantine/<id>", "uploads/<path>"
    sha256: str | None = None
    signature: str | None = None
    reason: str | None = None
    cause: str | None = None  # unscannable: encrypted, limits, malformed, unsupported, scan_error
    scanned_at: str | None = None
    allowlisted: bool = False
    size: int | None = None
    definitions: str | None = None
    detected_late_at: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, record: VerdictRecord) -> FileStatus:
        return cls(**record.public())


class Verdicts:
    def __init__(
        self,
        uploads_dir: Path,
        processed_dir: Path,
        staging_root: Path,
        capacity: int = 10_000,
        store: VerdictStore | None = None,
    ) -> None:
        self.uploads_dir = uploads_dir
        self.processed_dir = processed_dir
        self.staging_root = staging_root
        self.capacity = capacity
        self.store = store
        self._claims = ClaimIndex(staging_root)
        self._known: OrderedDict[str, tuple[float, FileStatus]] = OrderedDict()
        self._lock = threading.Lock()
        self._watchers: dict[str, list[Callable[[], None]]] = {}

    # -- written by the daemon ----------------------------------------------------------

    def record(self, result: Result) -> None:
        """Listener for final results; wakes whoever waits on this path."""
        state = state_of(result.outcome)
        if state is None:  # GONE: another daemon decided it
            return
        status = FileStatus(
            path=result.rel,
            state=state,
            location=self._location(result),
            sha256=result.sha256,
            signature=result.signature,
            reason=result.reason,
            cause=result.cause,
            scanned_at=None
            if state in ("rejected", "unscanned")
            else datetime.now(UTC).isoformat(timespec="milliseconds"),
            allowlisted=result.outcome is Outcome.ALLOWLISTED,
            size=result.size,
        )
        self._remember(result.rel, time.time(), status)

    def recorded(self, record: VerdictRecord) -> None:
        """Listener of the verdict store's writes (watcher/recording.py): a verdict stored
        (after a restart, too) or changed by a late detection."""
        self._remember(record.path, record.changed_at, FileStatus.of(record))

    def _remember(self, rel: str, at: float, status: FileStatus) -> None:
        with self._lock:
            known_at, known = self._known.get(rel, (0.0, None))
            if at >= known_at:
                self._known[rel] = (at, status)
                self._known.move_to_end(rel)
            while len(self._known) > self.capacity:
                self._known.popitem(last=False)
            news = known is None or _gist(known) != _gist(status)
            wake = list(self._watchers.get(rel, ())) if news else []
        for callback in wake:
            callback()

    # -- read by the API ----------------------------------------------------------------

    def watch(self, rel: str, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` (on the recording thread: it must be quick) whenever a verdict for
        `rel` is recorded; returns the function that stops it. Watch first, then look up:
        a verdict recorded in between is not missed."""
        with self._lock:
            self._watchers.setdefault(rel, []).append(wake)

        def unwatch() -> None:
            with self._lock:
                callbacks = self._watchers.get(rel, [])
                if wake in callbacks:
                    callbacks.remove(wake)
                if not callbacks:
                    self._watchers.pop(rel, None)

        return unwatch

    @property
    def waiting(self) -> int:
        """How many watches are active (the HTTP requests held on ``?wait``)."""
        with self._lock:
            return sum(len(callbacks) for callbacks in self._watchers.values())

    def lookup(self, rel: str) -> FileStatus:
        """`rel` is already checked: relative, no ``..``, no NUL (see api.parse_file_path)."""
        if self._inside_staging(rel):
            return FileStatus(rel, "unknown")
        st = self._lstat_upload(rel)
        if st is not None:
            reason = _refusal(st)
            if reason is not None:
                return FileStatus(rel, "rejected", location=f"uploads/{rel}", reason=reason)
            return FileStatus(rel, "pending", location=f"uploads/{rel}")
        with self._lock:
            recorded_at, known = self._known.get(rel, (0.0, None))
        try:
            stored = self.store.by_path(rel) if self.store is not None else None
        except StoreUnavailable:  # a database down: what this daemon knows, else ask again
            if known is None:
                raise
            stored = None
        if stored is not None and stored.changed_at > recorded_at:
            recorded_at, known = stored.changed_at, FileStatus.of(stored)
        # Claimed after the verdict we hold: a new upload under the same name, being scanned.
        # (The claim a verdict came from lingers in staging until its delivery is committed.)
        if any(at > recorded_at for at in self._claims.claimed_at(rel)):
            return FileStatus(rel, "pending")
        return known or FileStatus(rel, "unknown")

    def by_content(self, sha256: str) -> dict[str, Any]:
        """What is known of these bytes: the newest verdict's state, and each file's status."""
        records = self.store.by_sha256(sha256) if self.store is not None else []
        if not records:
            with self._lock:
                found = [s for _, s in reversed(self._known.values()) if s.sha256 == sha256]
        else:
            found = [FileStatus.of(r) for r in records]
        return {
            "sha256": sha256,
            "state": found[0].state if found else "unknown",
            "files": [f.to_json() for f in found],
        }

    # -- helpers ------------------------------------------------------------------------

    def _location(self, result: Result) -> str | None:
        dest = result.dest
        if dest is None:
            return f"uploads/{result.rel}" if result.outcome is Outcome.REJECTED else None
        if result.outcome in (Outcome.CLEAN, Outcome.ALLOWLISTED, Outcome.UNSCANNED):
            rel = relative_to(dest, self.processed_dir) or os.path.relpath(dest, self.processed_dir)
            return "processed/" + rel
        if result.outcome is Outcome.HELD:
            return f"held/{dest.name}"
        return f"quarantine/{dest.name}"

    def _inside_staging(self, rel: str) -> bool:
        path = os.path.join(self.uploads_dir, rel)
        root = str(self.staging_root)
        return path == root or path.startswith(root + os.sep)

    def _lstat_upload(self, rel: str) -> os.stat_result | None:
        """lstat inside uploads only: a symlinked directory on the way does not count.

        None too for a path that cannot be looked at (too long, a loop, no permission): the
        daemon could not take such a file either, so it is not pending.
        """
        path = self.uploads_dir / rel
        try:
            root = os.path.realpath(self.uploads_dir)
            parent = os.path.realpath(path.parent)
            if parent != root and not parent.startswith(root + os.sep):
                return None
            return os.lstat(path)
        except OSError:
            return None


def _gist(status: FileStatus) -> tuple[str | None, ...]:
    """What tells two verdicts apart (a stored one carries more fields than a fresh one)."""
    return status.state, status.sha256, status.location, status.signature


class ClaimIndex:
    """Which uploads are claimed right now, from the daemons' staging journals (their format:
    watcher/claims.py). Segments only grow, and are deleted whole: each byte is read once."""

    def __init__(self, staging_root: Path) -> None:
        self.staging_root = staging_root
        self._lock = threading.Lock()
        # segment -> (inode, bytes read, rel -> [(id, claimed at)])
        self._segments: dict[Path, tuple[int, int, dict[str, list[tuple[str, float]]]]] = {}

    def claimed_at(self, rel: str) -> list[float]:
        """When each live claim of `rel` was made (usually none, or one)."""
        with self._lock:
            self._refresh()
            found = []
            for segment, (_, _, rels) in self._segments.items():
                for claim_id, at in rels.get(rel, ()):
                    if os.path.lexists(claim_data(segment, claim_id)):
                        found.append(at)
            return found

    def _refresh(self) -> None:
        present = set(journal_segments(self.staging_root))
        for gone in self._segments.keys() - present:
            del self._segments[gone]
        for segment in present:
            try:
                self._read_new(segment)
            except OSError:
                self._segments.pop(segment, None)

    def _read_new(self, segment: Path) -> None:
        with open(segment, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            known_inode, offset, rels = self._segments.get(segment, (inode, 0, {}))
            if known_inode != inode:
                offset, rels = 0, {}
            f.seek(offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1  # a line still being written waits
        for fields in parse_journal(data):
            if "rel" in fields and isinstance(fields.get("at"), int | float):
                rels.setdefault(fields["rel"], []).append((fields["id"], float(fields["at"])))
        self._segments[segment] = (inode, offset + complete, rels)
