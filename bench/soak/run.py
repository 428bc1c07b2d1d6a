"""`make soak`: minutes of uploads under faults, then proof that nothing was lost.

`watcher run` (a subprocess, JSON logs on stdout) works on a real clamd while a seeded stream of
clean and infected files with awkward names arrives, and faults are injected at seeded moments:
SIGKILL of the daemon then a restart (20 or more), clamd stopped and started again, clamd frozen
with SIGSTOP for longer than the scan timeout, the processed filesystem full (a small tmpfs made
for the run, filled with a ballast file), a second daemon on the same directories, and a burst of
20,000 files past inotify's queue; the app's webhook receiver (soak.webhooks) is taken down
twice. Then the stream stops, the daemon drains, the last webhook events arrive, it stops
cleanly, and the end state is checked (soak.verify) with every verdict pushed. Prints a
table; exits 1 on any loss, duplicate, leftover or failed check, 2 when it cannot run (not
root, no clamd). See docs/soak.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clamd import Clamd, clamd_binary
from harness.daemon import daemon_env
from soak.corpus import Corpus, Upload
from soak.daemons import EventLog, Instance
from soak.report import Figures, report
from soak.schedule import BURST_FILES, SCAN_TIMEOUT_S, Action, Episode, build_schedule
from soak.verify import verify
from soak.webhooks import WebhookReceiver
from watcher.claims import claimed_files

TMPFS_SIZE = "512m"
DRAIN_RESERVE_S = 70.0  # of --minutes, kept for the drain, the clean stop and the checks
DRAIN_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
RSS_GROWTH_LIMIT_MB = 25.0
RESUME_WITHIN_S = 60.0  # held files are retried after 5 s, behind whatever was queued before
WEBHOOKS_TIMEOUT_S = 180.0  # after the drain: the outbox's last events reach the receiver
DELIVERED = ("file.clean", "file.renamed", "file.infected", "file.unscannable", "file.recovered")


# -- the run --------------------------------------------------------------------------------


@dataclass
class Soak:
    seed: int
    minutes: float
    rate: float
    base: Path
    uploads: list[Upload] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: EventLog = field(default_factory=EventLog)

    def __post_init__(self) -> None:
        self.window_s = self.minutes * 60 - DRAIN_RESERVE_S
        self.uploads_dir = self.base / "uploads"
        self.quarantine = self.base / "quarantine"
        self.fs = self.base / "processed-fs"  # the tmpfs mount point
        self.processed = self.fs / "processed"
        self.ballast = self.fs / "ballast"
        self.logs = self.base / "logs"
        self.corpus = Corpus(self.seed)
        self.writer_rng = random.Random(self.seed + 1)  # noqa: S311 - reproducible, not secret
        self.stop_stream = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self.primary: Instance | None = None
        self.peer: Instance | None = None
        self.clamd: Clamd | None = None
        self.mounted = False
        self.t0 = time.time()
        self.burst_src: list[tuple[Upload, bytes]] = []
        self.webhooks = WebhookReceiver()
        self.webhook_notes: list[str] = []

    # -- output ------------------------------------------------------------------------

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {text}"
        print(line, flush=True)
        with open(self.base / "timeline.txt", "a") as f:
            f.write(line + "\n")

    def problem(self, kind: str, text: str) -> None:
        self.problems.append((kind, text))
        self.say(f"PROBLEM ({kind}): {text}")

    # -- setup and teardown ------------------------------------------------------------

    def setup(self) -> None:
        for d in (
            self.uploads_dir / "burst",
            self.quarantine,
            self.fs,
            self.logs,
            self.base / "src",
        ):
            d.mkdir(parents=True, exist_ok=True)
        options = f"size={TMPFS_SIZE},mode=0755"
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "watcher-soak", str(self.fs)], check=True
        )
        self.mounted = True
        assert os.stat(self.fs).st_dev != os.stat(self.uploads_dir).st_dev
        self.clamd = Clamd(self.base / "clamd", max_threads=4).start()
        self.webhooks.start()
        self.burst_src = self.corpus.burst(BURST_FILES)
        src = self.base / "burst-src"
        src.mkdir()
        for upload, body in self.burst_src:
            (src / str(upload.seq)).write_bytes(body)

    def env(self) -> dict[str, str]:
        assert self.clamd is not None
        dirs = {"uploads": self.uploads_dir, "processed": self.processed}
        dirs |= {"quarantine": self.quarantine, "state": self.base / "state"}
        return daemon_env(
            dirs,
            self.clamd,
            WATCHER_SCAN_TIMEOUT_S=str(SCAN_TIMEOUT_S),
            WATCHER_SHUTDOWN_GRACE_S="10",
            WATCHER_UPDATE_COMMAND="",  # no freshclam here; the jobs otherwise run
            WATCHER_HTTP_ADDR="off",  # two daemons at once; the HTTP surface is not under test
            WATCHER_DEFINITIONS_DIR=str(self.clamd.db),
            WATCHER_LOG_LEVEL="INFO",
            **self.webhooks.env(),
        )

    def start_daemon(self, role: str) -> Instance:
        """Start without waiting: faults keep their times while a daemon starts up."""
        inst = Instance(len(self.instances) + 1, role, self.env(), self.log, self.logs, self.ready)
        self.instances.append(inst)
        return inst

    def ready(self, inst: Instance) -> None:
        self.say(f"{inst.role} #{inst.number} ready after {time.time() - inst.started:.1f}s")

    def teardown(self, keep: bool) -> None:
        for inst in self.instances:
            if inst.alive:
                inst.kill()
        if self.clamd is not None:
            self.clamd.stop()
        self.webhooks.stop()
        if self.mounted:
            if keep:
                shutil.copytree(self.processed, self.base / "processed-copy", symlinks=True)
            for args in (["umount", str(self.fs)], ["umount", "-l", str(self.fs)]):
                if subprocess.run(args, check=False).returncode == 0:
                    self.mounted = False
                    break
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- the stream of uploads ---------------------------------------------------------

    def stream(self) -> None:
        next_at = time.monotonic()
        while not self.stop_stream.is_set():
            upload, body = self.corpus.next()
            self.put(upload, body, direct=self.writer_rng.random() < 0.25)
            next_at = max(next_at + 1 / self.rate, time.monotonic() - 1)
            self.stop_stream.wait(max(0.0, next_at - time.monotonic()))

    def put(self, upload: Upload, body: bytes, direct: bool) -> None:
        """Rename in (as `mv` would), or write in place in two parts (a slow writer)."""
        target = os.path.join(os.fsencode(self.uploads_dir), upload.rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if direct:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, body[: len(body) // 2])
                time.sleep(self.writer_rng.uniform(0, 0.2))
                view = memoryview(body)[len(body) // 2 :]
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        else:
            src = os.path.join(os.fsencode(self.base / "src"), b"%d" % upload.seq)
            with open(src, "wb") as f:
                f.write(body)
            os.rename(src, target)
        upload.visible_at = time.time()
        with self._lock:
            self.uploads.append(upload)

    # -- faults ------------------------------------------------------------------------

    def run_schedule(self, actions: list[Action]) -> None:
        handlers: dict[str, Callable[[Action], None]] = {
            "kill": self.kill, "clamd_stop": self.clamd_stop, "clamd_start": self.clamd_start,
            "freeze": self.freeze, "thaw": self.thaw, "fill": self.fill, "free": self.free,
            "peer_start": self.peer_start, "peer_stop": self.peer_stop, "burst": self.burst,
        }  # fmt: skip
        start = time.monotonic()
        for action in actions:
            while time.monotonic() - start < action.at_s:
                self.watch_daemons()
                time.sleep(min(0.2, max(0.0, action.at_s - (time.monotonic() - start))))
            handlers[action.kind](action)
        while time.monotonic() - start < self.window_s:
            self.watch_daemons()
            time.sleep(0.2)

    def watch_daemons(self) -> None:
        """A daemon that exits without being told to, or never gets ready, is a problem."""
        for inst in (self.primary, self.peer):
            late = inst is not None and time.time() - inst.started > READY_TIMEOUT_S
            if inst is not None and late and inst.alive and not inst.ready.is_set():
                self.problem(
                    "daemon", f"{inst.role} #{inst.number} not ready in {READY_TIMEOUT_S:g}s"
                )
                inst.kill()
                inst.expected_exit = False  # restarted (primary) or dropped (peer) below
        if self.primary is not None and not self.primary.alive and not self.primary.expected_exit:
            self.problem(
                "daemon", f"primary #{self.primary.number} exited: {self.primary.proc.returncode}"
            )
            self.primary = self.start_daemon("primary")
        if self.peer is not None and not self.peer.alive and not self.peer.expected_exit:
            self.problem("daemon", f"peer #{self.peer.number} exited: {self.peer.proc.returncode}")
            self.peer = None

    def episode(self, kind: str, note: str = "") -> Episode:
        ep = Episode(kind, time.time(), note=note)
        self.episodes.append(ep)
        return ep

    def open_episode(self, kind: str) -> Episode:
        return next(e for e in reversed(self.episodes) if e.kind == kind and not e.end)

    def kill(self, action: Action) -> None:
        assert self.primary is not None
        state = "running" if self.primary.ready.is_set() else "starting up"
        ep = self.episode("kill", f"#{self.primary.number} {state}")
        self.say(
            f"SIGKILL primary #{self.primary.number} ({state}); restart in {action.value:.1f}s"
        )
        self.primary.kill()
        time.sleep(action.value)
        self.primary = self.start_daemon("primary")
        ep.end = time.time()

    def clamd_stop(self, action: Action) -> None:
        assert self.clamd is not None
        self.episode("clamd_restart")
        self.say("clamd: stop")
        self.clamd.stop()

    def clamd_start(self, action: Action) -> None:
        assert self.clamd is not None
        self.clamd.start()
        ep = self.open_episode("clamd_restart")
        ep.end = time.time()
        self.say(f"clamd: started again after {ep.end - ep.start:.1f}s down")

    def freeze(self, action: Action) -> None:
        assert self.clamd is not None
        self.episode("clamd_freeze")
        self.say("clamd: SIGSTOP")
        self.clamd.freeze()

    def thaw(self, action: Action) -> None:
        assert self.clamd is not None
        self.clamd.thaw()
        ep = self.open_episode("clamd_freeze")
        ep.end = time.time()
        self.say(f"clamd: SIGCONT after {ep.end - ep.start:.1f}s frozen")

    def fill(self, action: Action) -> None:
        ep = self.episode("storage_full")
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            size, chunk = os.fstat(fd).st_size, 1 << 30
            for _ in range(200):  # bounded: halve the chunk on each ENOSPC, down to a page
                if _free_bytes(self.fs) == 0 or chunk < 4096:
                    break
                try:
                    os.posix_fallocate(fd, size, min(chunk, max(_free_bytes(self.fs), 4096)))
                    size = os.fstat(fd).st_size
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        finally:
            os.close(fd)
        ep.note = f"ballast {size / 2**20:.0f} MiB, {_free_bytes(self.fs)} bytes free"
        self.say(f"processed fs full: {ep.note}")

    def free(self, action: Action) -> None:
        self.ballast.unlink(missing_ok=True)
        ep = self.open_episode("storage_full")
        ep.end = time.time()
        self.say(f"processed fs: space back after {ep.end - ep.start:.1f}s")

    def peer_start(self, action: Action) -> None:
        self.episode("peer")
        self.peer = self.start_daemon("peer")

    def peer_stop(self, action: Action) -> None:
        ep = self.open_episode("peer")
        if self.peer is not None:
            how = "SIGKILL" if action.value else "SIGTERM"
            self.say(f"peer #{self.peer.number}: {how}")
            if action.value:
                self.peer.kill()
            else:
                rc = self.peer.terminate()
                if rc != 0:
                    self.problem("daemon", f"peer #{self.peer.number} stopped with {rc}")
            ep.note = how
        self.peer = None
        ep.end = time.time()

    def burst(self, action: Action) -> None:
        """Rename the files in while the daemons are paused (SIGSTOP), as a reader that falls
        behind would be: more events than inotify's queue holds (16,384) are then waiting."""
        ep = self.episode("burst")
        src = self.base / "burst-src"
        target = os.fsencode(self.uploads_dir)
        if self.primary is not None:
            self.primary.ready.wait(READY_TIMEOUT_S)  # its watches exist: it can overflow
        paused = [i for i in (self.primary, self.peer) if i is not None and i.ready.is_set()]
        mark = len(self.log)
        for inst in paused:
            inst.proc.send_signal(signal.SIGSTOP)
        try:
            for upload, _body in self.burst_src:
                os.rename(src / str(upload.seq), os.path.join(target, upload.rel))
                upload.visible_at = time.time()
        finally:
            for inst in paused:
                inst.proc.send_signal(signal.SIGCONT)
        with self._lock:
            self.uploads.extend(u for u, _ in self.burst_src)
        ep.end = time.time()
        overflows = 0
        for _ in range(100):  # up to 10 s: each paused daemon reads IN_Q_OVERFLOW once resumed
            overflows = sum(_is_overflow(r) for r in self.log.since(mark))
            if overflows >= len(paused):
                break
            time.sleep(0.1)
        ep.note = f"{len(paused)} daemon(s) paused {ep.end - ep.start:.1f}s, {overflows} overflowed"
        self.say(f"burst: {len(self.burst_src):,} files renamed in; {ep.note}")

    # -- after the window --------------------------------------------------------------

    def drain(self) -> float:
        """Wait until uploads and staging are empty (twice in a row); returns the seconds taken."""
        started, settled = time.monotonic(), 0
        while time.monotonic() - started < DRAIN_TIMEOUT_S:
            self.watch_daemons()
            settled = settled + 1 if self._nothing_waiting() else 0
            if settled >= 2:
                return time.monotonic() - started
            time.sleep(1.0)
        self.problem("drain", f"uploads or staging not empty after {DRAIN_TIMEOUT_S:g}s")
        return time.monotonic() - started

    def _nothing_waiting(self) -> bool:
        staging = self.uploads_dir / ".watcher"
        if claimed_files(staging):
            return False
        for dirpath, dirs, names in os.walk(self.uploads_dir):
            if Path(dirpath) == self.uploads_dir and ".watcher" in dirs:
                dirs.remove(".watcher")
            if names:
                return False
        return True

    def sample_rss(self) -> None:
        while not self.done.wait(1.0):
            for inst in (self.primary, self.peer):
                if inst is not None and inst.alive:
                    inst.sample_rss()

    def run(self) -> int:
        rng = random.Random(self.seed)  # noqa: S311 - a reproducible schedule, not a secret
        schedule = build_schedule(rng, self.window_s, kills=max(20, int(self.window_s / 14)))
        self.say(
            f"seed {self.seed}, {self.minutes:g} minutes: {self.window_s:.0f}s of uploads and "
            f"faults ({dict(Counter(a.kind for a in schedule))}), then drain and checks; "
            f"files in {self.base}"
        )
        self.setup()
        self.t0 = time.time()
        self.primary = self.start_daemon("primary")
        if not self.primary.ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"the daemon does not start; see {self.logs}")
        threading.Thread(target=self.sample_rss, daemon=True).start()
        producer = threading.Thread(target=self.stream, daemon=True)
        producer.start()
        outages = threading.Thread(
            target=lambda: self.webhook_notes.extend(
                self.webhooks.outages(
                    random.Random(self.seed + 2),  # noqa: S311 - a reproducible schedule
                    self.window_s,
                    self.done,
                )
            ),
            daemon=True,
        )
        outages.start()
        try:
            self.run_schedule(schedule)
        finally:
            self.stop_stream.set()
            producer.join(timeout=30)
            self.restore()
        self.say(f"stream stopped after {len(self.uploads):,} uploads; draining")
        drain_s = self.drain()
        outages.join(timeout=60)
        waited_s = self.webhooks.wait_complete(self.uploads, WEBHOOKS_TIMEOUT_S)
        self.say(f"webhooks: every verdict pushed {waited_s:.1f}s after the drain, or none missing")
        assert self.primary is not None
        last = self.primary
        rc = last.terminate()
        self.done.set()
        if rc != 0:
            self.problem("daemon", f"primary #{last.number} stopped with exit code {rc}")
        self.say(f"drained in {drain_s:.1f}s; primary stopped (exit {rc}); checking")
        found = verify(self.uploads, self.uploads_dir, self.processed, self.quarantine)
        self.check_episodes()
        self.check_logs()
        rss = self.check_rss(last)
        webhooks = self.check_webhooks()
        figures = Figures(
            seed=self.seed,
            minutes=self.minutes,
            uploads=self.uploads,
            episodes=self.episodes,
            delivered_at=self.delivered_at(),
            problems=self.problems,
            notes=self.notes,
            found=found,
            rss=rss,
            webhooks=webhooks,
        )
        report(figures)
        return 1 if self.problems or found.problems else 0

    def restore(self) -> None:
        """Whatever the schedule left open (an error mid-way): clamd up, space back, no peer."""
        if self.clamd is not None:
            self.clamd.thaw()
            if not self.clamd.socket.exists():
                self.clamd.start()
        if self.ballast.exists():
            self.ballast.unlink()
        if self.peer is not None and self.peer.alive:
            self.peer.terminate()

    def check_webhooks(self) -> dict[str, int]:
        """Every upload's verdict pushed to the receiver (by idempotency key, at least once)."""
        lost = self.webhooks.missing(self.uploads)
        for upload in lost[:50]:
            self.problem("webhook", f"no event for #{upload.seq} {upload.kind} {upload.rel!r}")
        self.notes.extend(self.webhook_notes)
        counts = self.webhooks.counts
        return {
            "uploads": len(self.uploads),
            "ids": len(self.webhooks.events),
            "received": counts["received"],
            "repeated": counts["repeated"],
            "refused": counts["refused"],
            "lost": len(lost),
        }

    # -- checks on the log -------------------------------------------------------------

    def check_episodes(self) -> None:
        for ep in self.episodes:
            if ep.kind == "storage_full":
                self.check_storage_full(ep)
            elif ep.kind == "clamd_restart":
                self.check_once(ep, "clamd.down", ep.start, ep.end + 1)

    def check_once(self, ep: Episode, name: str, since: float, until: float) -> Counter[int]:
        per_instance = Counter(n for n, _r, t in self.log.named(name) if since <= t <= until)
        for number, count in per_instance.items():
            if count > 1:
                self.problem("events", f"{name} logged {count} times by #{number} in one {ep.kind}")
        return per_instance

    def check_storage_full(self, ep: Episode) -> None:
        full = self.check_once(ep, "storage.full", ep.start, ep.end + 1)
        ok_inside = [n for n, _r, t in self.log.named("storage.ok") if ep.start < t < ep.end]
        if ok_inside:  # allowed if no file was waiting then; a second storage.full is not
            ep.note += f"; storage.ok {len(ok_inside)}x while full"
        held = [
            u
            for u in self.uploads
            if not u.infected and u.size and ep.start < u.visible_at < ep.end - 6
        ]
        delivered = self.delivered_at()
        still_held = [u for u in held if delivered.get(u.rel, 0.0) > ep.end]
        oks = self.log.named("storage.ok")
        resumed = [t for _n, _r, t in oks if ep.end <= t < ep.end + RESUME_WITHIN_S]
        ep.note += f"; storage.full {sum(full.values())}x, held {len(still_held)}"
        if resumed:
            ep.note += f", storage.ok {min(resumed) - ep.end:.1f}s after space returned"
        if still_held and not full:
            self.problem("events", f"files held while full, but no storage.full ({ep.note})")
        for number in full:  # a daemon killed before its held files went through owes nothing
            inst = self.instances[number - 1]
            drained = inst is self.primary  # the last one: stopped once everything arrived
            if not drained and inst.ended and inst.ended < ep.end + RESUME_WITHIN_S:
                continue
            if not any(n == number and ep.end <= t for n, _r, t in oks):
                self.problem("events", f"#{number}: no storage.ok after space returned")

    def delivered_at(self) -> dict[bytes, float]:
        first: dict[bytes, float] = {}
        for _n, record, t in self.log.named(*DELIVERED):
            rel = os.fsencode(record.get("path", ""))
            if rel not in first or t < first[rel]:
                first[rel] = t
        return first

    def check_logs(self) -> None:
        for _n, record, _t in self.log.named("file.unscanned", "file.renamed"):
            self.problem("events", f"{record['event']}: {record.get('path')!r}")
        errors = Counter(
            r.get("event") for _n, r in self.log.records if r.get("level") in ("ERROR", "CRITICAL")
        )
        if errors:
            self.notes.append(f"ERROR events: {dict(errors)}")
        overflows = sum(_is_overflow(r) for r in self.log.since(0))
        self.notes.append(f"inotify overflow warnings: {overflows}")

    def check_rss(self, last: Instance) -> dict[str, float]:
        first = self.instances[0]
        start = _rss_after(first, 10.0)
        last_start, end = _rss_after(last, 10.0), (last.rss[-1][1] if last.rss else 0.0)
        peak = max((mb for inst in self.instances for _t, mb in inst.rss), default=0.0)
        rss = {"first": start, "last_start": last_start, "end": end, "peak": peak,
               "last_lived_s": (last.rss[-1][0] - last.started) if last.rss else 0.0}  # fmt: skip
        if end > min(start, last_start) + RSS_GROWTH_LIMIT_MB:
            self.problem(
                "rss", f"RSS grew: {start:.0f} MB → {end:.0f} MB (limit +{RSS_GROWTH_LIMIT_MB:g})"
            )
        return rss


def _is_overflow(record: dict[str, Any]) -> bool:
    """watchdog's WARNING, once per overflow (a second one follows when it rebuilds watches)."""
    return "queue overflowed; filesystem events were lost" in str(record.get("message", ""))


def _rss_after(inst: Instance, warmup_s: float) -> float:
    samples = [mb for t, mb in inst.rss if t >= inst.started + warmup_s]
    return samples[0] if samples else (inst.rss[-1][1] if inst.rss else 0.0)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--minutes", type=float, default=6.0, help="whole run, 4 or more")
    parser.add_argument("--rate", type=float, default=12.0, help="stream uploads per second")
    parser.add_argument("--keep", action="store_true", help="keep the run's files even on success")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak: must run as root (it mounts a tmpfs to fill)", file=sys.stderr)
        return 2
    if clamd_binary() is None or args.minutes < 4:
        print("soak: needs clamd (make install) and --minutes >= 4", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    base = Path(tempfile.mkdtemp(prefix=f"watcher-soak-{seed}-", dir="/var/tmp"))
    soak = Soak(seed, args.minutes, args.rate, base)
    failed = True
    try:
        failed = soak.run() != 0
    finally:
        soak.teardown(keep=failed or args.keep)
        if failed or args.keep:
            print(f"run files kept in {base} (logs/, timeline.txt, processed-copy/)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
