"""The daemon's core: intake → bounded queue → scan workers, with clamd's health in between.

`Daemon.start()` / `drain()` / `close()` run without signal handlers; watcher/service.py puts
the daemon together with its scheduled jobs and operations surface, which it knows nothing
of: they read its state (`alive`, `queue_depth`, `failing`, ...) and listen to its results
(`add_listener`). While clamd is down, or fails its canaries, the workers take nothing new
(files wait in uploads) and a monitor pings with backoff until it answers again.
"""

from __future__ import annotations

import heapq
import itertools
import os
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watcher.allowlist import Allowlist
from watcher.archives import look_inside_from_settings
from watcher.canaries import ClamdCheck
from watcher.claims import Claim, Staging
from watcher.clamav import ClamdScanner, Scanner, scanner_from_settings
from watcher.definitions import DefinitionsState, LoadedDefinitions
from watcher.delivery import Deliverer
from watcher.endpoints import EndpointStatus
from watcher.errors import ClamdUnavailable
from watcher.intake import Intake
from watcher.leases import LeaseKeeper, renew_interval_s
from watcher.logs import emit
from watcher.pipeline import Pipeline, PipelineConfig, Result, RetryCause, ScanSlots
from watcher.recording import recorder_from_settings
from watcher.settings import Settings, check_disjoint
from watcher.verdict import Outcome

WorkItem = Path | Claim
DEFAULT_WORKERS = 4


class WorkQueue:
    """Bounded, de-duplicated, with delayed items (retries). Hints beyond capacity are refused."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[tuple[float, int, str, WorkItem]] = []
        self._keys: set[str] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()

    def offer(self, item: WorkItem, delay_s: float = 0.0, force: bool = False) -> bool:
        key = _key(item)
        with self._cond:
            if key in self._keys:
                return True
            if len(self._heap) >= self.capacity and not force:
                return False
            self._keys.add(key)
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), key, item))
            self._cond.notify()
        return True

    def get(self, timeout_s: float) -> WorkItem | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, key, item = heapq.heappop(self._heap)
                    self._keys.discard(key)
                    return item
                wake = min(deadline, self._heap[0][0]) if self._heap else deadline
                if now >= deadline:
                    return None
                self._cond.wait(wake - now)

    def take_claims(self, pick: Callable[[Claim], bool]) -> list[Claim]:
        """Remove the due claims that `pick` chooses."""
        now = time.monotonic()
        with self._cond:
            kept, taken = [], []
            for entry in self._heap:
                item = entry[3]
                if entry[0] <= now and isinstance(item, Claim) and pick(item):
                    taken.append(item)
                    self._keys.discard(entry[2])
                else:
                    kept.append(entry)
            if taken:
                heapq.heapify(kept)
                self._heap = kept
        return taken

    def has_room(self) -> bool:
        """At most half full: worth sweeping for files whose hints did not fit."""
        return len(self._heap) <= self.capacity // 2

    def __len__(self) -> int:
        return len(self._heap)


def _key(item: WorkItem) -> str:
    return f"claim:{item.id}" if isinstance(item, Claim) else f"path:{item}"


class ClamdHealth:
    """Up/down state of clamd; one `clamd.down` per outage, one `clamd.up` when it returns."""

    def __init__(self, scanner: Scanner, stop: threading.Event, max_backoff_s: float = 5.0):
        self._scanner = scanner
        self._stop = stop
        self._max_backoff_s = max_backoff_s
        self.up = threading.Event()
        self.up.set()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self.down_since: float | None = None

    def mark_down(self, reason: str) -> None:
        with self._lock:
            if not self.up.is_set():
                return
            self.up.clear()
            self.down_since = time.monotonic()
            emit("clamd.down", reason=reason)
            self._monitor = threading.Thread(target=self._wait_for_clamd, daemon=True)
            self._monitor.start()

    def _wait_for_clamd(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                self._scanner.ping()
            except ClamdUnavailable:
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_backoff_s)
                continue
            down_s = time.monotonic() - (self.down_since or time.monotonic())
            self.down_since = None
            self.up.set()
            emit("clamd.up", down_s=round(down_s, 3))
            return


@dataclass(frozen=True)
class Partition:
    """Which uploads this daemon takes when `count` scan processes share the work: those
    whose relative path hashes to `index` (a stable hash: every process agrees, across
    restarts). One process takes everything.

    >>> [Partition(i, 3).owns("2026/report.pdf") for i in range(3)].count(True)
    1
    """

    index: int
    count: int

    def owns(self, rel: str) -> bool:
        if self.count == 1:
            return True
        return zlib.crc32(os.fsencode(rel)) % self.count == self.index


class DestinationHealth:
    """Deliveries each destination refused in a row; from `FAILING_AFTER` on it is failing.

    A destination that refuses every file (unwritable, another filesystem that refuses our
    moves, ...) makes the daemon not ready and is logged `delivery.failing` once, and
    `delivery.ok` once a delivery there succeeds again. Files wait meanwhile.
    """

    FAILING_AFTER = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, str]] = {}

    def failed(self, destination: str, reason: str) -> None:
        with self._lock:
            count = self._failures.get(destination, (0, ""))[0] + 1
            self._failures[destination] = (count, reason)
        if count == self.FAILING_AFTER:
            emit("delivery.failing", dest=destination, reason=reason)

    def delivered(self, destination: str) -> None:
        if destination not in self._failures:  # the hot path: no lock, nothing to do
            return
        with self._lock:
            count, _ = self._failures.pop(destination, (0, ""))
        if count >= self.FAILING_AFTER:
            emit("delivery.ok", dest=destination)

    def failing(self) -> dict[str, str]:
        """Each failing destination with the last reason it gave."""
        with self._lock:
            return {d: r for d, (n, r) in self._failures.items() if n >= self.FAILING_AFTER}


class Daemon:
    def __init__(
        self,
        settings: Settings,
        scanner: Scanner | None = None,
        partition: Partition = Partition(0, 1),
    ) -> None:
        self.settings = settings
        self.partition = partition
        self.scanner: Scanner = scanner or scanner_from_settings(settings)
        self.stop_event = threading.Event()
        self.staging = Staging(settings.staging_root, settings.staging_lease_s)
        self.lease_keeper = LeaseKeeper(
            renew_interval_s(settings.staging_lease_s),
            self.staging.renew_lease,
            self.staging.orphans_due,
            on_orphans=self._adopt_orphans,
            on_lost=self._lease_lost,
        )
        self.recorder = recorder_from_settings(settings)  # the verdict store: recording.py
        settle = self.recorder.settle if self.recorder.store is not None else None
        self.deliverer = Deliverer(
            settings.processed_dir, settings.quarantine_dir, self.staging, settle
        )
        self.allowlist = Allowlist(settings.state_dir / "allowlist")
        self.pipeline = Pipeline(
            PipelineConfig(
                uploads_dir=settings.uploads_dir,
                scanning_enabled=settings.scanning_enabled,
                max_file_bytes=settings.max_file_bytes,
                unscannable_policy=settings.unscannable_policy,
                max_scan_attempts=settings.max_scan_attempts,
                retry_max_backoff_s=settings.retry_max_backoff_s,
                max_depth=settings.max_depth,
            ),
            self.scanner,
            self.staging,
            self.deliverer,
            allowlisted=self.allowlist.contains,
            look_inside=look_inside_from_settings(settings, self.scanner),
        )
        self.destinations = DestinationHealth()
        processed, quarantine = str(settings.processed_dir), str(settings.quarantine_dir)
        self._destination_of = {
            Outcome.CLEAN: processed,
            Outcome.ALLOWLISTED: processed,
            Outcome.UNSCANNED: processed,
            Outcome.INFECTED: quarantine,
            Outcome.UNSCANNABLE: quarantine,
        }
        self.queue = WorkQueue(settings.queue_size)
        self.clamd = ClamdHealth(self.scanner, self.stop_event)
        self.clamd_check = ClamdCheck(
            self.scanner,
            self.pipeline.look_inside,
            settings.archive_max_depth,
            settings.accept_encrypted,
            settings.canary_interval_s,
            self.stop_event,
            on_unreachable=self.clamd.mark_down,
        )
        self.intake = Intake(
            settings.uploads_dir,
            self.queue.offer,
            self.queue.has_room,
            ignore_patterns=settings.ignore_patterns,
            settle_s=settings.settle_s,
            sweep_interval_s=settings.sweep_interval_s,
            polling=settings.observer == "polling",
            poll_interval_s=settings.poll_interval_s,
            skip_dirs=(settings.staging_root,),
            max_depth=settings.max_depth,
            owns=partition.owns,
            after_full_sweep=self._adopt_orphans,
        )
        self.definitions = DefinitionsState()
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._waiting_for_space: dict[Path | None, set[str]] = {}  # destination → claim ids
        self._listeners: list[Callable[[Result], None]] = [self.recorder.record_result]
        self._drained: int | None = None  # workers left unfinished by `drain`
        self._closed = False

    def add_listener(self, listener: Callable[[Result], None]) -> None:
        """Called with every final result (metrics, the verdict lookup, the delivery log)."""
        self._listeners.append(listener)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        check_disjoint(s)  # before anything is made or moved
        ignore_lease_breaks()
        s.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.recorder.open()  # before any claim can be settled
        self.deliverer.start()
        self.staging.open()
        self.lease_keeper.start()
        # clamd's threads are shared by every scan process: each gets its share of them.
        workers = -(-(s.workers or self._clamd_threads()) // self.partition.count)
        if not s.scanning_enabled:
            emit("watcher.scanning_disabled")
        self._report_definitions()
        self._check_clamd()
        for claim in self.staging.recover():
            self.queue.offer(claim, force=True)
        # `workers` scans in flight at most; twice as many threads, so that while some move
        # files or wait for an fsync, clamd still has a request for each of its threads.
        self.pipeline.scan_slots = ScanSlots(workers)
        for n in range(2 * workers):
            thread = threading.Thread(target=self._work, name=f"watcher-worker-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self.intake.start()
        emit(
            "watcher.ready",
            uploads=str(s.uploads_dir),
            processed=str(s.processed_dir),
            quarantine=str(s.quarantine_dir),
            workers=workers,
            observer=s.observer,
            scanning=s.scanning_enabled,
        )

    def drain(self) -> int:
        """Stop intake, let in-flight scans finish within the grace time; how many did not.

        Idempotent. What may still record a delivery (an unfinished worker) says whether the
        listeners' own files can be closed (see watcher/service.py).
        """
        if self._drained is not None:
            return self._drained
        emit("watcher.stopping", in_flight=self.in_flight)
        self.intake.stop()
        self.stop_event.set()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for thread in self._workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._drained = sum(t.is_alive() for t in self._workers)
        self.deliverer.close()
        self.clamd_check.close()
        return self._drained

    def close(self) -> None:
        """Drain, then release the staging directory. Idempotent."""
        unfinished = self.drain()
        if self._closed:
            return
        self._closed = True
        self.lease_keeper.stop()
        self.staging.close()
        self.recorder.close()
        emit("watcher.stopped", unfinished=unfinished)

    # -- what the operations surface reads (watcher/ops/state.py) ------------------------

    def alive(self) -> bool:
        return (
            self.intake.alive()
            and self.deliverer.committer.alive()
            and all(t.is_alive() for t in self._workers)
        )

    def intake_alive(self) -> bool:
        return self.intake.alive()

    def queue_depth(self) -> int:
        return len(self.queue)

    def probe_clamd(self, timeout_s: float) -> str | None:
        """Why clamd is not usable right now, or None. Marks it down when a PING fails."""
        if not self.settings.scanning_enabled:
            return None
        if not self.clamd.up.is_set():
            return "clamd is down: files wait until it answers PING again"
        try:
            if isinstance(self.scanner, ClamdScanner):
                self.scanner.ping(timeout=timeout_s)  # a pool: any usable endpoint
            else:
                self.scanner.ping()
        except ClamdUnavailable as err:
            self.clamd.mark_down(str(err))
            return str(err)
        return None

    def clamd_distrust(self) -> str | None:
        return self.clamd_check.problem

    def clamd_endpoints(self) -> list[EndpointStatus]:
        """A pool's endpoints (CLAMAV_HOST over TCP), each with its state; none otherwise."""
        return self.scanner.endpoints() if isinstance(self.scanner, ClamdScanner) else []

    def on_trust_change(self, listener: Callable[[], None]) -> None:
        self.clamd_check.listeners.append(listener)

    def failing_destinations(self) -> dict[str, str]:
        return self.destinations.failing()

    def uploads(self) -> Iterator[tuple[Path, os.stat_result]]:
        return self.intake.walk()

    # -- workers ------------------------------------------------------------------------

    def _clamd_threads(self) -> int:
        if not self.settings.scanning_enabled or not isinstance(self.scanner, ClamdScanner):
            return DEFAULT_WORKERS
        try:
            return self.scanner.max_threads() or DEFAULT_WORKERS
        except ClamdUnavailable as err:
            self.clamd.mark_down(str(err))
            return DEFAULT_WORKERS

    def _adopt_orphans(self) -> None:
        """Claims left by a daemon that stopped (or died) while we run: ours to finish."""
        for claim in self.staging.recover():
            emit("staging.adopted", path=claim.rel, id=claim.id)
            self.queue.offer(claim, force=True)

    def _lease_lost(self) -> None:
        """Another daemon took our lease (we were frozen or cut off longer than it): our
        claims are its now. Stop; a supervisor starts us afresh."""
        emit("staging.lease_lost", dir=str(self.staging.dir))
        self.stop_event.set()

    def _check_clamd(self) -> None:
        """Canaries (watcher/canaries.py) for a real clamd; a test's scripted scanner is trusted."""
        if self.settings.scanning_enabled and isinstance(self.scanner, ClamdScanner):
            self.clamd_check.start()
        else:
            self.clamd_check.trusted.set()
            self.clamd_check.problem = None

    def definitions_reloaded(self) -> None:
        self.pipeline.forget_clamd_version()
        if self.settings.scanning_enabled and isinstance(self.scanner, ClamdScanner):
            self.clamd_check.check()  # a new engine: checked again

    def _report_definitions(self) -> None:
        """Official databases put a version and date in VERSION's reply; custom-only sets don't."""
        if not self.settings.scanning_enabled:
            return
        try:
            version = self.scanner.version()
        except ClamdUnavailable:
            return
        loaded = LoadedDefinitions.parse(version)
        self.definitions.update(loaded)
        if not loaded.official:
            emit("definitions.test_only", clamd_version=version)
        else:
            emit("definitions.loaded", clamd_version=version)

    def _work(self) -> None:
        if isinstance(self.scanner, ClamdScanner):
            self.scanner.keep_session()
        while not self.stop_event.is_set():
            if not self.clamd.up.wait(timeout=0.5):
                self._hand_back_claims()  # clamd is down: files wait, for us or others
                continue
            if not self.clamd_check.trusted.wait(0.5):
                continue  # clamd answered a canary wrongly: files wait
            if not self.staging.lease.held():
                self.stop_event.wait(0.5)  # our lease lapsed: our claims may be adopted
                continue
            item = self.queue.get(timeout_s=0.5)
            if item is None:
                continue
            if not self.clamd.up.is_set():  # it went down while we waited for work
                self.queue.offer(item, force=True)
                continue
            with self._count_lock:
                self.in_flight += 1
            try:
                self._handle(item)
            except Exception:  # never let a worker die: the claim stays in staging
                emit("worker.error", exception=True)
            finally:
                with self._count_lock:
                    self.in_flight -= 1
        if isinstance(self.scanner, ClamdScanner):
            self.scanner.end_session()

    def _handle(self, item: WorkItem) -> None:
        if isinstance(item, Claim):
            result = self.pipeline.process_claim(item)
        else:
            result = self.pipeline.process_upload(item)
        if result.outcome is Outcome.RETRY:
            self._schedule_retry(result)
            return
        if isinstance(item, Claim) and self._waiting_for_space:
            self._space_settled(item.id)
        destination = self._destination_of.get(result.outcome)
        if destination is not None:
            self.destinations.delivered(destination)
        with self._count_lock:
            self.counts[result.outcome.value] += 1
        self.publish(result)

    def publish(self, result: Result) -> None:
        """Hand a final result to every listener (also for results of other scan processes)."""
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:
                emit("listener.error", exception=True)

    def _space_settled(self, claim_id: str) -> None:
        """`storage.ok` once the last file that waited for space in a destination is settled.

        Not on the first delivery that succeeds: on a nearly full disk small files still fit
        (and deliveries elsewhere go on) while a larger one waits, and every such success would
        otherwise end the outage only for the next retry to start it again.
        """
        emptied = []
        with self._count_lock:
            for dest, waiting in list(self._waiting_for_space.items()):
                if claim_id in waiting:
                    waiting.discard(claim_id)
                    if not waiting:
                        del self._waiting_for_space[dest]
                        emptied.append(dest)
        for dest in emptied:
            emit("storage.ok", dest=_str(dest))

    def _hand_back_claims(self) -> None:
        """While clamd is down, put our queued claims back into uploads (`file.released`),
        where another replica whose clamd answers takes them. A claim whose scan already
        failed (clamd died under it: the file may be what kills it) is kept for the lease
        bound, so that a clamd restarted meanwhile counts its attempts to the limit; past
        that we are as good as dead to it, and it goes too."""
        down_since = self.clamd.down_since
        if down_since is None:
            return
        long_down = time.monotonic() - down_since >= self.settings.staging_lease_s

        def waits_for_clamd(claim: Claim) -> bool:
            # Not one with a verdict or a delivery begun: it needs no clamd, and may already
            # be in its destination (then a copy back in uploads would be delivered twice).
            unscanned = claim.verdict is None and claim.dest is None
            return unscanned and (long_down or claim.attempts == 0)

        for claim in self.queue.take_claims(waits_for_clamd):
            if self.staging.unclaim(claim, self.settings.uploads_dir):
                emit("file.released", path=claim.rel, reason="clamd is down")
            else:  # its name was taken meanwhile: it stays ours, and waits
                self.queue.offer(claim, delay_s=self.settings.staging_lease_s, force=True)

    def _schedule_retry(self, result: Result) -> None:
        assert result.claim is not None
        if result.retry_cause is RetryCause.CLAMD_DOWN:
            self.clamd.mark_down(result.reason or "")
            if self.staging.unclaim(result.claim, self.settings.uploads_dir):
                # Back in uploads, where it waits for us or for another replica's clamd.
                emit("file.released", path=result.rel, reason=result.reason)
                return
        elif result.retry_cause is RetryCause.DELIVERY:
            self.destinations.failed(_str(result.dest) or "?", result.reason or "")
        elif result.retry_cause is RetryCause.STORAGE_FULL:
            with self._count_lock:
                waiting = self._waiting_for_space.setdefault(result.dest, set())
                first = not waiting
                waiting.add(result.claim.id)
            if first:
                emit("storage.full", path=result.rel, dest=_str(result.dest), reason=result.reason)
        else:
            emit(
                "file.retry",
                path=result.rel,
                reason=result.reason,
                attempt=result.claim.attempts,
                retry_in_s=result.retry_after_s,
            )
        self.queue.offer(result.claim, delay_s=result.retry_after_s, force=True)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def ignore_lease_breaks() -> None:
    """Leases (see fsops.writer_active) signal SIGIO on a break; its default would kill us."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)
