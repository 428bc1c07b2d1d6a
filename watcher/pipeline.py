"""One file's way through: check → claim → scan → check again → deliver.

`Pipeline.process` never raises for an expected failure: it returns a `Result`, and a result
whose outcome is RETRY carries the claim so the caller can try again later. Only an explicit
clean verdict from clamd reaches processed (or, with scanning switched off, a loud
`file.unscanned`).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from watcher.clamav import Scanner
from watcher.deliver import Deliverer
from watcher.errors import ClamdUnavailable, StorageError, StorageFull
from watcher.fsops import OPEN_UPLOAD_FLAGS, relative_to, sha256_fd
from watcher.staging import Claim, Staging
from watcher.verdict import Cause, Clean, Infected, NotScanned, Verdict

_MAX_RESCANS = 3
_REJECTED_MEMORY = 10_000


class Outcome(enum.StrEnum):
    CLEAN = "clean"
    INFECTED = "infected"
    UNSCANNABLE = "unscannable"
    UNSCANNED = "unscanned"  # scanning switched off: delivered, never presented as scanned
    ALLOWLISTED = "allowlisted"  # detected, but its sha256 was restored by an operator
    REJECTED = "rejected"
    HELD = "held"
    RETRY = "retry"
    GONE = "gone"  # someone else claimed it, or it vanished


class RetryCause(enum.StrEnum):
    CLAMD_DOWN = "clamd_down"
    STORAGE_FULL = "storage_full"
    SCAN_FAILED = "scan_failed"
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


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
        self._rejected: set[tuple[str, int, int]] = set()
        self.scan_slots = threading.BoundedSemaphore(4)  # the daemon sets clamd's MaxThreads
        self._clamd_version: str | None = None

    # -- entry points -------------------------------------------------------------------

    def process_upload(self, path: Path) -> Result:
        rel = relative_to(path, self.config.uploads_dir) or os.path.relpath(
            path, self.config.uploads_dir
        )
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Result(Outcome.GONE, rel)
        reason = _refusal(st)
        if reason is not None:
            return self._reject(rel, st, reason)
        claim = self.staging.claim(path, rel)
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
        except (StorageError, OSError) as err:
            logger.bind(event="file.error", path=claim.rel, reason=str(err)).exception("failed")
            claim.errors += 1  # backs off to WATCHER_RETRY_MAX_BACKOFF_S: a lasting fault, one line
            result = self._retry(claim, RetryCause.ERROR, str(err), self._backoff(claim.errors))
        result.duration_ms = round((time.perf_counter() - started) * 1000, 2)
        return result

    # -- steps --------------------------------------------------------------------------

    def _process_claim(self, claim: Claim) -> Result:
        delivered = self.deliverer.finish_interrupted(claim)
        if delivered is not None:
            logger.bind(event="file.recovered", path=claim.rel, dest=str(delivered)).info(
                "delivery finished after restart"
            )
            return Result(Outcome.GONE, claim.rel, dest=delivered)
        try:
            fd = os.open(claim.data, OPEN_UPLOAD_FLAGS)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            return self._reject_claim(claim, os.lstat(claim.data), "symlink")
        try:
            st = os.fstat(fd)
            reason = _refusal(st)
            if reason is not None:
                return self._reject_claim(claim, st, reason)
            return self._scan_and_deliver(claim, fd, st)
        finally:
            os.close(fd)

    def _scan_and_deliver(self, claim: Claim, fd: int, st: os.stat_result) -> Result:
        if st.st_size > self.config.max_file_bytes:
            reason = f"larger than WATCHER_MAX_FILE_BYTES ({self.config.max_file_bytes})"
            return self._unscannable(claim, fd, st.st_size, sha256_fd(fd), reason, "limits")
        if not self.config.scanning_enabled:
            sha = sha256_fd(fd)
            dest = self.deliverer.to_processed(claim, fd)
            logger.bind(
                event="file.unscanned", path=claim.rel, dest=str(dest), size=st.st_size, sha256=sha
            ).warning("delivered WITHOUT scanning: VIRUS_SCANNING_ENABLED=false")
            return Result(Outcome.UNSCANNED, claim.rel, dest=dest, size=st.st_size, sha256=sha)
        verdict, sha, st = self._scan_unchanged(fd, st)
        if isinstance(verdict, Clean):
            return self._deliver_clean(claim, fd, st.st_size, sha)
        if isinstance(verdict, Infected):
            if self.allowlisted(sha):  # a restored false positive: deliver, loudly
                return self._deliver_clean(claim, fd, st.st_size, sha, verdict.signature)
            return self._quarantine(claim, fd, st.st_size, sha, verdict.signature)
        if verdict.transient:
            claim.attempts += 1
            if claim.attempts < self.config.max_scan_attempts:
                return self._retry(
                    claim, RetryCause.SCAN_FAILED, verdict.reason, self._backoff(claim.attempts)
                )
        return self._unscannable(claim, fd, st.st_size, sha, verdict.reason, verdict.cause)

    def _scan_unchanged(self, fd: int, st: os.stat_result) -> tuple[Verdict, str, os.stat_result]:
        """Scan until the file stays the same across one scan (a writer may still hold it)."""
        for _ in range(_MAX_RESCANS):
            with self.scan_slots:  # never more requests in flight than clamd has threads
                verdict = self.look_inside(fd, self.scanner.scan_fd(fd))
            sha = sha256_fd(fd)
            after = os.fstat(fd)
            if _identity(after) == _identity(st):
                return verdict, sha, st
            logger.bind(event="file.changed", size=after.st_size).info("changed during scan")
            st = after
        return NotScanned("file kept changing during the scan", transient=True), sha, st

    # -- outcomes -----------------------------------------------------------------------

    def _deliver_clean(
        self, claim: Claim, fd: int, size: int, sha: str, allowlisted_signature: str | None = None
    ) -> Result:
        dest = self.deliverer.to_processed(claim, fd)
        fields: dict[str, Any] = {"path": claim.rel, "dest": str(dest), "size": size, "sha256": sha}
        if dest.name != os.path.basename(claim.rel):  # the name was taken: " (n)" added
            fields["renamed_from"] = str(self.deliverer.processed_dir / claim.rel)
            logger.bind(event="file.renamed", **fields).warning("name taken in processed")
        if allowlisted_signature is not None:
            logger.bind(
                event="file.allowlisted", signature=allowlisted_signature, **fields
            ).warning("detected, but its sha256 is allowlisted: delivered")
            return Result(
                Outcome.ALLOWLISTED, claim.rel, dest=dest, size=size, sha256=sha,
                signature=allowlisted_signature,
            )  # fmt: skip
        logger.bind(event="file.clean", **fields).info("clean")
        return Result(Outcome.CLEAN, claim.rel, dest=dest, size=size, sha256=sha)

    def _quarantine(self, claim: Claim, fd: int, size: int, sha: str, signature: str) -> Result:
        meta = self._metadata(claim, size, sha, "infected", signature=signature)
        dest = self.deliverer.to_quarantine(claim, fd, meta)
        logger.bind(
            event="file.infected", path=claim.rel, dest=str(dest), id=claim.id, size=size,
            sha256=sha, signature=signature,
        ).warning("infected: quarantined")  # fmt: skip
        return Result(
            Outcome.INFECTED, claim.rel, dest=dest, size=size, sha256=sha, signature=signature
        )

    def _unscannable(
        self, claim: Claim, fd: int, size: int, sha: str, reason: str, cause: Cause
    ) -> Result:
        fields: dict[str, Any] = {
            "path": claim.rel, "size": size, "sha256": sha, "reason": reason, "cause": cause,
        }  # fmt: skip
        if self.config.unscannable_policy == "hold":
            dest = self.staging.hold(claim)
            logger.bind(event="file.unscannable", action="held", dest=str(dest), **fields).error(
                "could not be scanned: held"
            )
            return Result(
                Outcome.HELD, claim.rel, dest=dest, size=size, sha256=sha, reason=reason,
                cause=cause,
            )  # fmt: skip
        meta = self._metadata(claim, size, sha, "unscannable", reason=reason, cause=cause)
        dest = self.deliverer.to_quarantine(claim, fd, meta)
        logger.bind(
            event="file.unscannable", action="quarantined", id=claim.id, dest=str(dest), **fields
        ).error("could not be scanned: quarantined")
        return Result(
            Outcome.UNSCANNABLE, claim.rel, dest=dest, size=size, sha256=sha, reason=reason,
            cause=cause,
        )  # fmt: skip

    def _reject(self, rel: str, st: os.stat_result, reason: str) -> Result:
        key = (rel, st.st_ino, st.st_mtime_ns)
        if key in self._rejected:  # met again by a sweep: neither logged nor counted again
            return Result(Outcome.REJECTED, rel, reason=reason, fields={"repeat": True})
        if len(self._rejected) >= _REJECTED_MEMORY:
            self._rejected.clear()
        self._rejected.add(key)
        logger.bind(event="file.rejected", path=rel, reason=reason).warning("not scanned")
        return Result(Outcome.REJECTED, rel, reason=reason)

    def _reject_claim(self, claim: Claim, st: os.stat_result, reason: str) -> Result:
        """Swapped in between our check and our claim: give it back untouched."""
        if not self.staging.unclaim(claim, self.config.uploads_dir):
            reason += " (left in staging: its name was taken)"
        return self._reject(claim.rel, st, reason)

    def _retry(self, claim: Claim, cause: RetryCause, reason: str, delay_s: float) -> Result:
        return Result(
            Outcome.RETRY, claim.rel, claim=claim, reason=reason, retry_cause=cause,
            retry_after_s=delay_s,
        )  # fmt: skip

    def _backoff(self, failures: int) -> float:
        return float(min(self.config.retry_max_backoff_s, 0.5 * 2**failures))

    def _metadata(
        self, claim: Claim, size: int, sha: str, verdict: str, **extra: Any
    ) -> dict[str, Any]:
        return {
            "id": claim.id,
            "original_path": claim.rel,
            "size": size,
            "sha256": sha,
            "verdict": verdict,
            "signature": None,
            "reason": None,
            "cause": None,
            **extra,
            "detected_at": datetime.now(UTC).isoformat(),
            "claimed_at": datetime.fromtimestamp(claim.claimed_at, UTC).isoformat(),
            "clamd_version": self._version(),
        }

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


def _refusal(st: os.stat_result) -> str | None:
    """Why an entry must not be read, or None for a plain, singly-linked file."""
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return "more than one hard link"
    return None
