"""One file's way through: check → claim → scan → check again → deliver.

`Pipeline.process` never raises for an expected failure: it returns a `Result`, and a result
whose outcome is RETRY carries the claim so the caller can try again later. Only an explicit
clean verdict from clamd reaches processed (or, with scanning switched off, a loud
`file.unscanned`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import queue
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.claims import Claim, Staging
from watcher.clamav import Scanner
from watcher.delivery import Deliverer
from watcher.errors import ClamdUnavailable, StorageError, StorageFull
from watcher.fsops import (
    lease_broken,
    open_parent,
    relative_to,
    sha256_fd,
    split_rel,
    take_read_lease,
)
from watcher.logs import emit
from watcher.quarantine import new_record
from watcher.recording import verdict_note
from watcher.verdict import Cause, Clean, Infected, NotScanned, Outcome, Verdict

_MAX_RESCANS = 3


class RetryCause(enum.StrEnum):
    CLAMD_DOWN = "clamd_down"
    STORAGE_FULL = "storage_full"
    SCAN_FAILED = "scan_failed"
    DELIVERY = "delivery"  # a destination refused it: the file waits
    ERROR = "error"


@dataclass
class Result:
    outcome: Outcome
    rel: str
    claim: Claim | None = None
    dest: Path | None = None
    size: int | None = None
    sha256: str | None = None
    signature: str | None = None
    reason: str | None = None
    cause: Cause | None = None  # why unscannable, from a closed set (verdict.Cause)
    retry_cause: RetryCause | None = None
    retry_after_s: float = 0.0
    duration_ms: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    uploads_dir: Path
    scanning_enabled: bool = True
    max_file_bytes: int = 100 * 1024 * 1024
    unscannable_policy: str = "quarantine"
    max_scan_attempts: int = 5
    retry_max_backoff_s: float = 30.0
    max_depth: int = 64


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    # ctime too: a writer can put size and mtime back (utimensat), never the ctime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# A claim we cannot open for a reason that will not pass: it is unscannable at once.
_LASTING_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EISDIR, errno.EOVERFLOW}
# Our own shortage, not the file's: retried without counting against the file.
_OWN_SHORTAGE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# A destination refusing this one file (not the destination as a whole).
_FILE_BOUND_DELIVERY_ERRNOS = {errno.EFBIG, errno.ENAMETOOLONG, errno.EOVERFLOW}


class _Open:
    """The claim's open fd, and whether we hold a read lease on it; closing drops the lease."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.leased = False

    def replace(self, fd: int) -> None:
        os.close(self.fd)
        self.fd = fd
        self.leased = False

    def close(self) -> None:
        os.close(self.fd)


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        scanner: Scanner,
        staging: Staging,
        deliverer: Deliverer,
        allowlisted: Callable[[str], bool] = lambda sha256: False,
        look_inside: Callable[[int, Verdict], Verdict] = lambda fd, verdict: verdict,
    ) -> None:
        self.config = config
        self.allowlisted = allowlisted
        self.look_inside = look_inside  # archives.Inspector.check: what clamd could not see
        self.scanner = scanner
        self.staging = staging
        self.deliverer = deliverer
        self._rejections = RejectionLog()
        self.scan_slots = ScanSlots(4)  # the daemon sets clamd's MaxThreads
        self._clamd_version: str | None = None

    # -- entry points -------------------------------------------------------------------

    def process_upload(self, path: Path) -> Result:
        rel = relative_to(path, self.config.uploads_dir) or os.path.relpath(
            path, self.config.uploads_dir
        )
        try:
            parts = split_rel(rel)
        except ValueError:
            return Result(Outcome.GONE, rel)
        if len(parts) > self.config.max_depth:
            return self._reject(
                rel, None, f"deeper than WATCHER_MAX_DEPTH ({self.config.max_depth})"
            )
        try:
            parent = open_parent(self.config.uploads_dir, parts)
        except (FileNotFoundError, NotADirectoryError):
            # Gone, or a directory on its way was swapped for a symlink (which never leads us
            # anywhere: the symlink itself is rejected when a sweep meets it).
            return Result(Outcome.GONE, rel)
        except OSError as err:
            return self._reject(rel, None, f"cannot reach it: {err.strerror}")
        try:
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return Result(Outcome.GONE, rel)
            reason = _refusal(st)
            if stat.S_ISDIR(st.st_mode):  # intake offers a directory only at the depth limit
                reason = f"a directory at WATCHER_MAX_DEPTH ({self.config.max_depth}): not read"
            if reason is not None:
                return self._reject(rel, st, reason)
            claim = self.staging.claim(parent, parts[-1], rel)
        except OSError as err:
            return self._reject(rel, None, f"cannot claim it: {err.strerror}")
        finally:
            os.close(parent)
        if claim is None:
            return Result(Outcome.GONE, rel)
        return self.process_claim(claim)

    def process_claim(self, claim: Claim) -> Result:
        started = time.perf_counter()
        try:
            result = self._process_claim(claim)
        except ClamdUnavailable as err:
            result = self._retry(claim, RetryCause.CLAMD_DOWN, str(err), 0.0)
        except StorageFull as err:
            result = self._retry(claim, RetryCause.STORAGE_FULL, str(err), 5.0)
            result.dest = err.directory  # which destination is full
        except StorageError as err:
            result = self._delivery_failed(claim, err)
        except OSError as err:
            result = self._unreadable(claim, err)
        result.duration_ms = round((time.perf_counter() - started) * 1000, 2)
        return result

    # -- steps --------------------------------------------------------------------------

    def _process_claim(self, claim: Claim) -> Result:
        delivered = self.deliverer.finish_interrupted(claim)
        if delivered is not None:
            emit("file.recovered", path=claim.rel, dest=str(delivered))
            return Result(Outcome.GONE, claim.rel, dest=delivered)
        try:
            fd = self.staging.open_claim(claim)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            return self._reject_claim(claim, self.staging.lstat_claim(claim), "symlink")
        upload = _Open(fd)
        try:
            st = os.fstat(fd)
            reason = _refusal(st)
            if reason is not None:
                return self._reject_claim(claim, st, reason)
            return self._scan_and_deliver(claim, upload, st)
        finally:
            upload.close()

    def _scan_and_deliver(self, claim: Claim, upload: _Open, st: os.stat_result) -> Result:
        if st.st_size > self.config.max_file_bytes:
            # Decided before reading a byte: a sparse file of a terabyte costs nothing here.
            reason = f"larger than WATCHER_MAX_FILE_BYTES ({self.config.max_file_bytes})"
            return self._unscannable(claim, upload.fd, st.st_size, None, reason, "limits")
        if not self.config.scanning_enabled:
            sha = sha256_fd(upload.fd)
            self._note_verdict(claim, Outcome.UNSCANNED, st.st_size, sha)
            dest = self.deliverer.to_processed(claim, upload.fd)
            emit("file.unscanned", path=claim.rel, dest=str(dest), size=st.st_size, sha256=sha)
            return Result(Outcome.UNSCANNED, claim.rel, dest=dest, size=st.st_size, sha256=sha)
        st = self._hold(claim, upload)
        for _ in range(_MAX_RESCANS):
            verdict, sha, st = self._scan_unchanged(claim, upload, st)
            if isinstance(verdict, Clean):
                result = self._deliver_clean(claim, upload, st.st_size, sha)
            elif isinstance(verdict, Infected) and self.allowlisted(sha):
                # A restored false positive: deliver, loudly.
                result = self._deliver_clean(claim, upload, st.st_size, sha, verdict.signature)
            elif isinstance(verdict, Infected):
                return self._quarantine(claim, upload.fd, st.st_size, sha, verdict.signature)
            else:
                return self._not_scanned(claim, upload.fd, st.st_size, sha, verdict)
            if result is not None:
                return result
            # Someone asked to write the file as it went into processed: its new name was
            # taken back before anyone could write; scan a private copy instead.
            emit("file.changed", path=claim.rel, reason="opened for writing")
            st = self._privatize(claim, upload)
        verdict = NotScanned("file kept changing during the scan", transient=True)
        return self._not_scanned(claim, upload.fd, st.st_size, sha, verdict)

    def _hold(self, claim: Claim, upload: _Open) -> os.stat_result:
        """Make sure nobody else can write the claim's bytes until we are done with them.

        A read lease when the kernel grants one (no writer has the file open; it is ours or
        we have CAP_LEASE); else a private copy, which nobody else has ever opened.
        """
        if take_read_lease(upload.fd):
            upload.leased = True
            return os.fstat(upload.fd)
        return self._privatize(claim, upload)

    def _privatize(self, claim: Claim, upload: _Open) -> os.stat_result:
        try:
            fd = self.staging.privatize(claim, upload.fd)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"private copy: {err.strerror}", self.config.uploads_dir) from err
            raise
        upload.replace(fd)  # the uploader's inode (and our lease on it, if any) is let go
        upload.leased = take_read_lease(fd)
        return os.fstat(fd)

    def _not_scanned(
        self, claim: Claim, fd: int, size: int, sha: str, verdict: NotScanned
    ) -> Result:
        if verdict.transient:
            claim.attempts += 1
            if claim.attempts < self.config.max_scan_attempts:
                return self._retry(
                    claim, RetryCause.SCAN_FAILED, verdict.reason, self._backoff(claim.attempts)
                )
        return self._unscannable(claim, fd, size, sha, verdict.reason, verdict.cause)

    def _scan_unchanged(
        self, claim: Claim, upload: _Open, st: os.stat_result
    ) -> tuple[Verdict, str, os.stat_result]:
        """Scan until the file stays the same across one scan (a writer may still hold it)."""
        sha = ""
        for _ in range(_MAX_RESCANS):
            with self.scan_slots:  # never more requests in flight than clamd has threads
                verdict = self.look_inside(upload.fd, self.scanner.scan_fd(upload.fd))
            sha = sha256_fd(upload.fd)
            after = os.fstat(upload.fd)
            if upload.leased and lease_broken(upload.fd):
                # Someone asked to write it (they wait until we let go): what we scanned
                # is not what they will leave. Scan a copy of our own instead.
                emit("file.changed", path=claim.rel, reason="opened for writing")
                st = self._privatize(claim, upload)
                continue
            if _identity(after) == _identity(st):
                return verdict, sha, st
            emit("file.changed", path=claim.rel, size=after.st_size)
            st = after
        return NotScanned("file kept changing during the scan", transient=True), sha, st

    # -- outcomes -----------------------------------------------------------------------

    def _deliver_clean(
        self,
        claim: Claim,
        upload: _Open,
        size: int,
        sha: str,
        allowlisted_signature: str | None = None,
    ) -> Result | None:
        """Into processed; None when the delivery was taken back (see `_scan_and_deliver`)."""

        def nobody_asked_to_write() -> bool:
            return not (upload.leased and lease_broken(upload.fd))

        outcome = Outcome.CLEAN if allowlisted_signature is None else Outcome.ALLOWLISTED
        self._note_verdict(claim, outcome, size, sha, signature=allowlisted_signature)
        dest = self.deliverer.to_processed(claim, upload.fd, confirm=nobody_asked_to_write)
        if dest is None:
            return None
        fields: dict[str, Any] = {"path": claim.rel, "dest": str(dest), "size": size, "sha256": sha}
        if os.path.join(self.deliverer._processed, claim.rel) != str(dest):  # " (n)" added
            fields["renamed_from"] = str(self.deliverer.processed_dir / claim.rel)
            emit("file.renamed", **fields)
        if allowlisted_signature is not None:
            emit("file.allowlisted", signature=allowlisted_signature, **fields)
            return Result(
                Outcome.ALLOWLISTED,
                claim.rel,
                dest=dest,
                size=size,
                sha256=sha,
                signature=allowlisted_signature,
            )
        emit("file.clean", **fields)
        return Result(Outcome.CLEAN, claim.rel, dest=dest, size=size, sha256=sha)

    def _quarantine(self, claim: Claim, fd: int, size: int, sha: str, signature: str) -> Result:
        meta = self._record(claim, Outcome.INFECTED, size, sha, signature=signature)
        self._note_verdict(claim, Outcome.INFECTED, size, sha, signature=signature)
        dest = self.deliverer.to_quarantine(claim, fd, meta)
        emit(
            "file.infected",
            path=claim.rel,
            dest=str(dest),
            id=claim.id,
            size=size,
            sha256=sha,
            signature=signature,
        )
        return Result(
            Outcome.INFECTED, claim.rel, dest=dest, size=size, sha256=sha, signature=signature
        )

    def _unscannable(
        self,
        claim: Claim,
        fd: int | None,
        size: int | None,
        sha: str | None,
        reason: str,
        cause: Cause,
    ) -> Result:
        """Quarantined (or held, per WATCHER_UNSCANNABLE_POLICY) with the reason.

        ``fd`` None: a file we cannot even read; it is moved as it is, or held where it
        cannot be moved to the quarantine without reading it (another filesystem).
        """
        fields: dict[str, Any] = {
            "path": claim.rel,
            "size": size,
            "sha256": sha,
            "reason": reason,
            "cause": cause,
        }
        held = self.config.unscannable_policy == "hold"
        if not held:
            meta = self._record(claim, Outcome.UNSCANNABLE, size, sha, reason=reason, cause=cause)
            self._note_verdict(claim, Outcome.UNSCANNABLE, size, sha, reason=reason, cause=cause)
            try:
                dest = self.deliverer.to_quarantine(claim, fd, meta)
            except OSError as err:  # unreadable, and the quarantine is on another filesystem
                if fd is not None or err.errno != errno.EXDEV:
                    raise
                held = True
        if held:
            dest = self.staging.hold(claim)
            emit("file.unscannable", action="held", dest=str(dest), **fields)
        else:
            emit("file.unscannable", action="quarantined", id=claim.id, dest=str(dest), **fields)
        return Result(
            Outcome.HELD if held else Outcome.UNSCANNABLE,
            claim.rel,
            dest=dest,
            size=size,
            sha256=sha,
            reason=reason,
            cause=cause,
        )

    def _reject(self, rel: str, st: os.stat_result | None, reason: str) -> Result:
        # The same entry, unless replaced (a directory's mtime changes with what it holds).
        changed = 0 if st is None or stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
        key = (rel, st.st_ino if st is not None else 0, changed)
        if not self._rejections.first(key, time.monotonic()):
            # Met again by a sweep (or one of a flood): neither logged nor counted again.
            return Result(Outcome.REJECTED, rel, reason=reason, fields={"repeat": True})
        emit("file.rejected", path=rel, reason=reason)
        return Result(Outcome.REJECTED, rel, reason=reason)

    def _unreadable(self, claim: Claim, err: OSError) -> Result:
        """Opening or reading the claim failed: retried, unless it cannot pass (or has failed
        WATCHER_MAX_SCAN_ATTEMPTS times); then it is unscannable, with the reason."""
        reason = f"cannot read it: {err.strerror or err}"
        if err.errno in _OWN_SHORTAGE_ERRNOS:
            emit("file.error", path=claim.rel, reason=reason)
            return self._retry(claim, RetryCause.ERROR, reason, self._backoff(1))
        claim.errors += 1
        if err.errno not in _LASTING_ERRNOS and claim.errors < self.config.max_scan_attempts:
            emit("file.error", path=claim.rel, reason=reason, exception=True)
            return self._retry(claim, RetryCause.ERROR, reason, self._backoff(claim.errors))
        size = None
        with contextlib.suppress(OSError):
            size = self.staging.lstat_claim(claim).st_size
        try:
            return self._unscannable(claim, None, size, None, reason, "unreadable")
        except (StorageError, OSError) as move_err:
            emit("file.error", path=claim.rel, reason=str(move_err))
            return self._retry(claim, RetryCause.ERROR, reason, self._backoff(claim.errors))

    def _delivery_failed(self, claim: Claim, err: StorageError) -> Result:
        """A destination refused the file: it waits (the daemon tracks the destination's
        health), unless the refusal is about this one file and has lasted."""
        reason = str(err)
        if err.errno in _FILE_BOUND_DELIVERY_ERRNOS:
            claim.errors += 1
            if claim.errors >= self.config.max_scan_attempts:
                try:
                    return self._unscannable(claim, None, None, None, reason, "limits")
                except (StorageError, OSError):
                    pass
        emit("file.error", path=claim.rel, reason=reason)
        claim.delivery_failures += 1
        result = self._retry(
            claim, RetryCause.DELIVERY, reason, self._backoff(claim.delivery_failures)
        )
        result.dest = err.directory
        return result

    def _reject_claim(self, claim: Claim, st: os.stat_result, reason: str) -> Result:
        """Swapped in between our check and our claim: give it back untouched."""
        if not self.staging.unclaim(claim, self.config.uploads_dir):
            reason += " (left in staging: its name was taken)"
        return self._reject(claim.rel, st, reason)

    def _retry(self, claim: Claim, cause: RetryCause, reason: str, delay_s: float) -> Result:
        return Result(
            Outcome.RETRY,
            claim.rel,
            claim=claim,
            reason=reason,
            retry_cause=cause,
            retry_after_s=delay_s,
        )

    def _backoff(self, failures: int) -> float:
        return float(min(self.config.retry_max_backoff_s, 0.5 * 2**failures))

    def _record(
        self, claim: Claim, outcome: Outcome, size: int | None, sha: str | None, **known: Any
    ) -> dict[str, Any]:
        claimed_at = datetime.fromtimestamp(claim.claimed_at, UTC).isoformat()
        return new_record(
            claim.id,
            claim.rel,
            outcome,
            size=size,
            sha256=sha,
            clamd_version=self._version(),
            claimed_at=claimed_at,
            **known,
        )

    def _note_verdict(
        self, claim: Claim, outcome: Outcome, size: int | None, sha: str | None, **known: Any
    ) -> None:
        """Into the claim's journal before the delivery: see watcher/recording.py."""
        definitions = self._version() if self.config.scanning_enabled else None
        note = verdict_note(claim, outcome, size, sha, definitions, **known)
        self.staging.note_verdict(claim, note)

    def forget_clamd_version(self) -> None:
        """clamd loaded new definitions: the next quarantine record asks VERSION again."""
        self._clamd_version = None

    def _version(self) -> str | None:
        if self._clamd_version is None:
            try:
                self._clamd_version = self.scanner.version()
            except ClamdUnavailable:
                return None
        return self._clamd_version


class ScanSlots:
    """At most `count` holders at a time (`with slots:`), for scans in flight.

    A queue of tokens rather than threading.BoundedSemaphore: that one is Python code over a
    Condition, run twice per file by every worker (a lock made for each wait, a notify walking
    the waiters); SimpleQueue's get and put are C, and a waiting get sleeps on one lock.
    """

    def __init__(self, count: int) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(count):
            self._tokens.put(None)

    def __enter__(self) -> None:
        self._tokens.get()

    def __exit__(self, *exc_info: object) -> None:
        self._tokens.put(None)


def _refusal(st: os.stat_result) -> str | None:
    """Why an entry must not be read, or None for a plain, singly-linked file."""
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return "more than one hard link"
    return None


class RejectionLog:
    """Which rejected entries were already reported: each once while it stays, and a flood
    (more than `memory` distinct entries) reported at most `burst` lines a minute."""

    def __init__(self, memory: int = 100_000, burst: int = 100) -> None:
        self._seen: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._memory = memory
        self._burst = burst
        self._window_start = 0.0
        self._in_window = 0

    def first(self, key: tuple[str, int, int], now: float) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) <= self._memory:
            return True
        self._seen.popitem(last=False)  # a flood: the oldest is forgotten, reports are metered
        if now - self._window_start >= 60:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        return self._in_window <= self._burst
