"""Rescanning recent deliveries once clamd has new signatures.

A file delivered clean may be detected by newer signatures, and the app may already have served
it: `file.infected_late` at ERROR is the alert that matters most. The file leaves processed for
the quarantine (metadata ``detected_late: true``) by link-then-unlink, never overwriting, and only
if processed still holds the very file we delivered (same device and inode). Archives are looked
into as at delivery (watcher/archives.py): new signatures for a member of a ZIP64 or a second
zip clamd does not read would otherwise never reach it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from watcher import provenance
from watcher.claims import new_id
from watcher.clamav import Scanner
from watcher.delivery import QUARANTINE_FILE_MODE
from watcher.fsops import (
    OPEN_UPLOAD_FLAGS,
    copy_to_new_file,
    fsync_dir,
    open_root,
    sha256_fd,
    write_json_atomic,
)
from watcher.jobs.deliveries import Delivery, DeliveryLog
from watcher.logs import emit
from watcher.quarantine import new_record
from watcher.store import VerdictRecord
from watcher.verdict import Infected, NotScanned, Outcome, Verdict


@dataclass
class RescanReport:
    scanned: int = 0
    infected: int = 0
    skipped: int = 0  # gone from processed, or replaced by another file
    failed: int = 0  # clamd gave no verdict
    complete: bool = True


class Rescanner:
    def __init__(
        self,
        scanner: Scanner,
        log: DeliveryLog,
        quarantine_dir: Path,
        window_s: float,
        stop: threading.Event,
        allowlisted: Callable[[str], bool] = lambda sha256: False,
        on_late: Callable[[VerdictRecord, str], object] = lambda record, location: None,
        look_inside: Callable[[int, Verdict], Verdict] = lambda fd, verdict: verdict,
    ) -> None:
        self.allowlisted = allowlisted
        self.look_inside = look_inside  # archives.Inspector.check, as the pipeline does
        self.on_late = on_late  # recording.Recorder.mark_late: the store, the webhooks
        self.scanner = scanner
        self.log = log
        self.processed_dir = log.processed_dir
        self.quarantine_dir = quarantine_dir
        self.window_s = window_s
        self.stop = stop

    def run(self, now: datetime) -> RescanReport:
        """Rescan deliveries within the window. Raises ClamdUnavailable (the caller retries).

        Two passes: files whose (old-engine) scan ended while the first pass ran are only in
        the log by the time the first pass is over.
        """
        report = RescanReport()
        since = now - timedelta(seconds=self.window_s)
        done: set[tuple[str, int, int]] = set()
        version = self.scanner.version()
        for _ in range(2):
            batch = [e for e in self.log.entries(since) if (e.dest, e.dev, e.ino) not in done]
            for entry in batch:
                if self.stop.is_set():
                    report.complete = False
                    return report
                done.add((entry.dest, entry.dev, entry.ino))
                self._rescan(entry, report, version)
        emit(
            "rescan.finished",
            scanned=report.scanned,
            infected=report.infected,
            skipped=report.skipped,
            failed=report.failed,
            window_s=self.window_s,
        )
        return report

    def _rescan(self, entry: Delivery, report: RescanReport, version: str) -> None:
        path = self.processed_dir / entry.dest
        try:
            fd = os.open(path, OPEN_UPLOAD_FLAGS)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
            report.skipped += 1
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
                report.skipped += 1
                return
            verdict = self.look_inside(fd, self.scanner.scan_fd(fd))
            report.scanned += 1
            if isinstance(verdict, Infected) and entry.sha256 and self.allowlisted(entry.sha256):
                report.skipped += 1  # an operator restored these bytes as a false positive
            elif isinstance(verdict, Infected):
                if self._quarantine(entry, path, fd, st, verdict.signature, version):
                    report.infected += 1
                else:
                    report.skipped += 1
            elif isinstance(verdict, NotScanned):
                report.failed += 1
                emit("file.rescan_failed", path=entry.rel, reason=verdict.reason)
        finally:
            os.close(fd)

    def _quarantine(
        self, entry: Delivery, path: Path, fd: int, st: os.stat_result, signature: str, version: str
    ) -> bool:
        qid = new_id()
        target = self.quarantine_dir / qid
        record = self.quarantine_dir / f"{qid}.json"
        sha = sha256_fd(fd)
        meta = new_record(
            qid,
            entry.rel,
            Outcome.INFECTED,
            size=st.st_size,
            sha256=sha,
            clamd_version=version,
            signature=signature,
            processed_path=entry.dest,
            detected_late=True,
            delivered_at=entry.at.isoformat(),
        )
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(record, json.dumps(meta, indent=1).encode())  # metadata first
        removed = _move_out(path, fd, st, target)
        if removed is None:
            record.unlink(missing_ok=True)
            return False
        now = time.time()
        late = VerdictRecord(
            id=qid,
            path=entry.rel,
            verdict="infected",
            decided_at=now,
            sha256=sha,
            size=st.st_size,
            signature=signature,
            definitions=version,
            location=f"quarantine/{qid}",
            late_at=now,
        )
        with contextlib.suppress(OSError):  # the app's own links to it say so, too
            provenance.stamp(fd, late.to_json())
        try:  # stored (and the app told) before the alert: who reacts to it finds it there
            self.on_late(late, f"processed/{entry.dest}")
        except Exception as err:
            emit("store.write_failed", count=1, reason=str(err))
        emit(
            "file.infected_late",
            path=entry.rel,
            processed_path=str(path),
            dest=str(target),
            id=qid,
            size=st.st_size,
            sha256=sha,
            signature=signature,
            delivered_at=entry.at.isoformat(),
            removed_from_processed=removed,
        )
        return True


def _move_out(path: Path, fd: int, st: os.stat_result, target: Path) -> bool | None:
    """Give the delivered file `target`'s name, then drop its processed name.

    Returns whether processed lost the file (False: the app took it meanwhile), or None when
    the name in processed no longer holds the file we scanned (nothing moved). Between two
    mounts (EXDEV, whatever st_dev says) the quarantine gets a copy.
    """
    qdir = open_root(target.parent)
    try:
        try:
            os.link(path, target.name, dst_dir_fd=qdir, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM):
                raise
            tmp = f".{target.name}.tmp"
            copy_to_new_file(fd, qdir, tmp, QUARANTINE_FILE_MODE)
            os.rename(tmp, target.name, src_dir_fd=qdir, dst_dir_fd=qdir)  # ours: unique names
        else:
            linked = os.stat(target.name, dir_fd=qdir, follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):  # replaced under us
                os.unlink(target.name, dir_fd=qdir)
                return None
            os.fchmod(fd, QUARANTINE_FILE_MODE)
        os.fsync(qdir)
    finally:
        os.close(qdir)
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return False
    if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
        return False
    os.unlink(path)
    fsync_dir(path.parent)
    return True
