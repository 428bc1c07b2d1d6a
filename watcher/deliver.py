"""Delivery: claimed files into processed (clean) or quarantine (infected, unscannable).

Same filesystem: a hard link under the first free name, then unlink the claim. Across
filesystems: copy to a temp name in the destination directory, fsync, rename into place
without overwriting, fsync the directory, then unlink the claim. The destination is noted in
the claim's record before the step that makes it visible, so a crash before the unlink is
finished by `finish_interrupted` at the next start, never delivered twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from watcher.fsops import (
    copy_fd_to_new_file,
    fsync_dir,
    noclobber_names,
    rename_noreplace,
    sha256_fd,
    storage_error,
    write_json_atomic,
)
from watcher.staging import Claim, Staging

QUARANTINE_FILE_MODE = 0o400
_MADE_DIRS_MEMORY = 10_000
COMMIT_GATHER_S = 0.01
COMMIT_BATCH_MAX = 256


class Deliverer:
    def __init__(self, processed_dir: Path, quarantine_dir: Path, staging: Staging) -> None:
        self.processed_dir = processed_dir
        self.quarantine_dir = quarantine_dir
        self.staging = staging
        self.committer = Committer(staging)
        self._made_dirs: set[str] = set()
        # The per-file path work is done on str: pathlib's objects showed as a sixth of the
        # daemon's Python time in the bench's profile.
        self._processed = str(processed_dir)
        self._quarantine = str(quarantine_dir)

    def start(self) -> None:
        self.processed_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.quarantine_dir, 0o700)
        self.committer.start()

    def close(self) -> None:
        self.committer.close()

    def to_processed(self, claim: Claim, fd: int) -> Path:
        """Deliver under the upload's relative path; a taken name gets `` (n)`` added."""
        directory, name = os.path.split(os.path.join(self._processed, claim.rel))
        names = noclobber_names(name)
        try:
            self._make_dir(directory)
            try:
                return self._move(claim, fd, directory, names)
            except FileNotFoundError:  # someone removed the directory since we made it
                self._made_dirs.discard(directory)
                self._make_dir(directory)
                return self._move(claim, fd, directory, names)
        except OSError as err:
            raise storage_error(err, "deliver to processed", self.processed_dir) from err

    def _make_dir(self, directory: str) -> None:
        """mkdir -p, remembered: asking again for every file cost two syscalls and an exception."""
        if directory in self._made_dirs:
            return
        os.makedirs(directory, exist_ok=True)
        if len(self._made_dirs) >= _MADE_DIRS_MEMORY:
            self._made_dirs.clear()
        self._made_dirs.add(directory)

    def to_quarantine(self, claim: Claim, fd: int, metadata: dict[str, Any]) -> Path:
        """Metadata first (so data is never without it), then the bytes, read-only."""
        try:
            os.fchmod(fd, QUARANTINE_FILE_MODE)
            record = self.quarantine_dir / f"{claim.id}.json"
            write_json_atomic(record, json.dumps(metadata, indent=1).encode())
            return self._move(claim, fd, self._quarantine, lambda n: claim.id, 0o400)
        except OSError as err:
            raise storage_error(err, "deliver to quarantine", self.quarantine_dir) from err

    def finish_interrupted(self, claim: Claim) -> Path | None:
        """After a crash mid-copy: clean up, and say if the claim had in fact arrived."""
        if claim.dest is None:
            return None
        dest = Path(claim.dest)
        _tmp_name(dest.parent, claim).unlink(missing_ok=True)
        if not os.path.lexists(dest) or not _same_content(claim.data, dest):
            return None
        os.unlink(claim.data)
        self.staging.release(claim)
        return dest

    def _move(
        self, claim: Claim, fd: int, directory: str, name: Callable[[int], str], mode: int = 0o644
    ) -> Path:
        """Give the claim the first free name in `directory`, then drop its staging name.

        Same filesystem: a hard link, which fails rather than replace a name, and leaves the
        staging name in place until the committer has made the new one durable. The
        destination is noted in the claim's record first, so a crash between link and unlink
        is finished at the next start instead of delivering twice.
        """
        same_fs = os.fstat(fd).st_dev == os.stat(directory).st_dev
        source = claim.data
        if not same_fs:
            source = _tmp_name(Path(directory), claim)
            self.staging.note_dest(claim, os.path.join(directory, name(0)))
            source.unlink(missing_ok=True)  # left by a crash before this attempt
            copy_fd_to_new_file(fd, source, mode if mode == QUARANTINE_FILE_MODE else 0o600)
            if mode != QUARANTINE_FILE_MODE:
                os.chmod(source, os.fstat(fd).st_mode & 0o777)
        for n in itertools.count():
            dest = os.path.join(directory, name(n))
            if n or same_fs:
                self.staging.note_dest(claim, dest)
            try:
                if same_fs:
                    os.link(source, dest, follow_symlinks=False)
                else:
                    rename_noreplace(source, Path(dest))
            except FileExistsError:
                continue
            break
        self.committer.submit(claim, directory)
        return Path(dest)


class Committer:
    """Makes deliveries durable in batches, off the workers' path.

    A delivered claim has its new name but keeps its staging name until an fsync of the new
    name's directory has completed; then the staging name and record go. One fsync per
    directory per batch instead of one per file; a crash before it leaves a claim whose
    record names its destination, which `finish_interrupted` completes.
    """

    def __init__(self, staging: Staging) -> None:
        self._staging = staging
        self._cond = threading.Condition()
        self._pending: list[tuple[Claim, str]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watcher-commit", daemon=True)
        self._thread.start()

    def submit(self, claim: Claim, directory: str) -> None:
        with self._cond:
            self._pending.append((claim, directory))
            if len(self._pending) == 1 or len(self._pending) >= COMMIT_BATCH_MAX:
                self._cond.notify()  # not per file: the committer is gathering

    def close(self) -> None:
        """Commit what is pending, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
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

    def _commit(self, batch: list[tuple[Claim, str]]) -> None:
        synced: set[str] = set()
        for directory in dict.fromkeys(d for _, d in batch):
            try:
                fsync_dir(directory)
                synced.add(directory)
            except OSError as err:  # the claims stay; the next start finishes them
                logger.bind(event="commit.failed", dir=str(directory), reason=str(err)).error(
                    "fsync failed"
                )
        for claim, directory in batch:
            if directory not in synced:
                continue
            try:
                claim.data.unlink(missing_ok=True)
                self._staging.release(claim)
            except OSError as err:  # the claim stays; the next start finishes it
                logger.bind(event="commit.failed", path=claim.rel, reason=str(err)).error(
                    "could not drop the staging name"
                )


def _tmp_name(directory: Path, claim: Claim) -> Path:
    return directory / f".watcher-{claim.id}.tmp"


def _same_content(a: Path, b: Path) -> bool:
    with contextlib.ExitStack() as stack:
        fds = []
        for path in (a, b):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            fds.append(fd)
        sa, sb = os.fstat(fds[0]), os.fstat(fds[1])
        if os.path.samestat(sa, sb):
            return True
        return sa.st_size == sb.st_size and sha256_fd(fds[0]) == sha256_fd(fds[1])
