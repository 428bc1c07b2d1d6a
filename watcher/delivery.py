"""Delivery: claimed files into processed (clean) or quarantine (infected, unscannable).

A hard link under the first free name, then (once the new name is durable) the claim's staging
name goes. Where the kernel refuses a link (between two mounts, even of one filesystem, as with
container volumes), the bytes are copied to a temp name in the destination, fsynced and renamed
into place without overwriting (`fsops.place_noclobber`). The destination is noted in the
claim's journal before the step that makes it visible, so a crash before the staging name goes
is finished by `finish_interrupted` at the next start, never delivered twice.

The upload's directories are recreated below processed one component at a time, never through
a symlink; a component whose name is taken by a file gets `` (n)`` like a file name would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watcher import provenance
from watcher.claims import Claim, Staging
from watcher.fsops import (
    make_dirs_beneath,
    noclobber_names,
    open_root,
    place_noclobber,
    rename_noreplace,
    sha256_fd,
    split_rel,
    storage_error,
    write_json_atomic,
)
from watcher.logs import emit

QUARANTINE_FILE_MODE = 0o400
COMMIT_GATHER_S = 0.01
COMMIT_BATCH_MAX = 256
SETTLE_RETRY_S = 1.0


Settle = Callable[[list[Claim]], None]


class Deliverer:
    def __init__(
        self,
        processed_dir: Path,
        quarantine_dir: Path,
        staging: Staging,
        settle: Settle | None = None,
    ) -> None:
        self.processed_dir = processed_dir
        self.quarantine_dir = quarantine_dir
        self.staging = staging
        self.committer = Committer(staging, settle)
        # The per-file path work is done on str: pathlib's objects showed as a sixth of the
        # daemon's Python time in the bench's profile.
        self._processed = str(processed_dir)
        self._quarantine = str(quarantine_dir)

    def start(self) -> None:
        self.processed_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.quarantine_dir, 0o700)
        provenance.forget_reports()
        self.committer.start()

    def close(self) -> None:
        self.committer.close()

    def to_processed(
        self, claim: Claim, fd: int, confirm: Callable[[], bool] = lambda: True
    ) -> Path | None:
        """Deliver under the upload's relative path; a taken name gets `` (n)`` added.

        ``confirm()`` is asked once the file has its new name: False takes that name back
        (returns None) before anything is committed, e.g. because someone asked to write the
        file meanwhile.
        """
        parts = split_rel(claim.rel)
        mode = os.fstat(fd).st_mode & 0o777
        if claim.verdict is not None:
            provenance.stamp(fd, claim.verdict)  # on the inode, before it is visible
        try:
            for attempt in range(2):
                root = open_root(self._processed)
                try:
                    parent, used = make_dirs_beneath(root, parts[:-1], 0o777)
                finally:
                    os.close(root)
                directory = os.path.join(self._processed, *used)
                try:
                    name = self._place(
                        claim, fd, parent, directory, noclobber_names(parts[-1]), mode
                    )
                except FileNotFoundError:
                    os.close(parent)  # someone removed the directory since we made it
                    if attempt:
                        raise
                    continue
                except BaseException:
                    os.close(parent)
                    raise
                break
        except OSError as err:
            raise storage_error(err, "deliver to processed", self.processed_dir) from err
        if not confirm():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            os.close(parent)
            claim.dest = None
            return None
        self.committer.submit(claim, parent)
        return Path(directory, name)

    def to_quarantine(self, claim: Claim, fd: int | None, metadata: dict[str, Any]) -> Path:
        """Metadata first (so data is never without it), then the bytes, read-only.

        ``fd`` None: a file we may not even read is moved as it is, by rename (the same
        filesystem only; OSError EXDEV otherwise).
        """
        try:
            qdir = open_root(self._quarantine)
        except OSError as err:
            raise storage_error(err, "deliver to quarantine", self.quarantine_dir) from err
        try:
            record = json.dumps(metadata, indent=1).encode()
            write_json_atomic(Path(f"{claim.id}.json"), record, dir_fd=qdir)
            if fd is None:
                self.staging.note_dest(claim, os.path.join(self._quarantine, claim.id))
                rename_noreplace(self.staging.dir_fd, claim.name, qdir, claim.id)
                os.fsync(qdir)
                self.committer.settle_now(claim)
                self.staging.drop(claim)
                os.close(qdir)
                return self.quarantine_dir / claim.id
            os.fchmod(fd, QUARANTINE_FILE_MODE)
            name = self._place(
                claim, fd, qdir, self._quarantine, lambda n: claim.id, QUARANTINE_FILE_MODE
            )
        except OSError as err:
            os.close(qdir)
            if fd is None and err.errno == errno.EXDEV:
                raise
            raise storage_error(err, "deliver to quarantine", self.quarantine_dir) from err
        self.committer.submit(claim, qdir)
        return self.quarantine_dir / name

    def finish_interrupted(self, claim: Claim) -> Path | None:
        """After a crash mid-delivery: clean up, and say if the claim had in fact arrived."""
        if claim.dest is None:
            return None
        dest = Path(claim.dest)
        with contextlib.suppress(OSError):
            (dest.parent / _tmp_name(claim)).unlink(missing_ok=True)
        if not os.path.lexists(dest) or not self._same_content(claim, dest):
            return None
        if claim.verdict is None:  # nothing to record (a journal from before the store)
            self.staging.drop(claim)
            return dest
        try:  # settled like a fresh delivery: its record first, then its staging name goes
            self.committer.submit(claim, open_root(dest.parent))
        except OSError:
            self.committer.settle_now(claim)
            self.staging.drop(claim)
        return dest

    def _place(
        self,
        claim: Claim,
        fd: int,
        dir_fd: int,
        directory: str,
        names: Callable[[int], str],
        mode: int,
    ) -> str:
        def note(name: str) -> None:
            self.staging.note_dest(claim, os.path.join(directory, name))

        name, _ = place_noclobber(
            self.staging.dir_fd,
            claim.name,
            fd,
            dir_fd,
            names,
            tmp_name=_tmp_name(claim),
            mode=mode,
            before_each=note,
        )
        return name

    def _same_content(self, claim: Claim, dest: Path) -> bool:
        with contextlib.ExitStack() as stack:
            try:
                a = self.staging.open_claim(claim)
                stack.callback(os.close, a)
                b = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                stack.callback(os.close, b)
            except FileNotFoundError:
                return False
            sa, sb = os.fstat(a), os.fstat(b)
            if os.path.samestat(sa, sb):
                return True
            return sa.st_size == sb.st_size and sha256_fd(a) == sha256_fd(b)


class Committer:
    """Makes deliveries durable in batches, off the workers' path.

    A delivered claim has its new name but keeps its staging name until an fsync of the new
    name's directory has completed; then the staging name and journal entry go. One fsync per
    directory per batch instead of one per file; a crash before it leaves a claim whose
    journal names its destination, which `finish_interrupted` completes. Each submission hands
    over an open fd of the destination directory, so the fsync reaches the very directory the
    file went into.
    """

    def __init__(self, staging: Staging, settle: Settle | None = None) -> None:
        self._staging = staging
        self._settle = settle  # records the verdicts (watcher/recording.py) before the drop
        self._cond = threading.Condition()
        self._pending: list[tuple[Claim, int]] = []
        self._unsettled: list[Claim] = []  # durable, but their records could not be written
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watcher-commit", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, claim: Claim, dir_fd: int) -> None:
        """``dir_fd`` is the committer's to close."""
        with self._cond:
            self._pending.append((claim, dir_fd))
            if len(self._pending) == 1 or len(self._pending) >= COMMIT_BATCH_MAX:
                self._cond.notify()  # not per file: the committer is gathering

    def close(self) -> None:
        """Commit what is pending, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def settle_now(self, claim: Claim) -> None:
        """Record one claim's verdict at once (a delivery the committer does not see)."""
        if self._settle is not None and claim.verdict is not None:
            try:
                self._settle([claim])
            except Exception as err:
                emit("store.write_failed", count=1, reason=str(err))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    if self._unsettled:  # the store failed: try again in a moment
                        self._cond.wait(SETTLE_RETRY_S)
                        break
                    self._cond.wait()
                if not self._pending and (self._stopping or not self._unsettled):
                    return  # claims left unsettled stay in staging: the next start settles them
                # Deliveries that finish within the next few ms share the batch's fsyncs
                # (each one a journal commit). Nobody waits for this: the file is already
                # in its destination; only its staging name stays a little longer.
                deadline = time.monotonic() + COMMIT_GATHER_S
                while len(self._pending) < COMMIT_BATCH_MAX and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = self._pending, []
            self._commit(batch)

    def _commit(self, batch: list[tuple[Claim, int]]) -> None:
        synced: dict[tuple[int, int], bool] = {}
        store_was_failing = bool(self._unsettled)
        durable, self._unsettled = self._unsettled, []
        try:
            for claim, dir_fd in batch:
                try:
                    st = os.fstat(dir_fd)
                    key = (st.st_dev, st.st_ino)
                    if key not in synced:
                        os.fsync(dir_fd)
                        synced[key] = True
                except OSError as err:  # the claim stays; the next start finishes it
                    emit("commit.failed", path=claim.rel, reason=str(err))
                    continue
                durable.append(claim)
        finally:
            for _, dir_fd in batch:
                os.close(dir_fd)
        if durable and self._settle is not None:
            try:
                self._settle(durable)
            except Exception as err:  # no record, no drop: kept, and tried again
                if not store_was_failing:  # once until a write succeeds, not every second
                    emit("store.write_failed", count=len(durable), reason=str(err))
                self._unsettled = durable
                return
        for claim in durable:
            try:
                self._staging.drop(claim)
            except OSError as err:  # the claim stays; the next start finishes it
                emit("commit.failed", path=claim.rel, reason=str(err))


def _tmp_name(claim: Claim) -> str:
    return f".watcher-{claim.id}.tmp"
