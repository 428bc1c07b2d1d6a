"""`make bench-replicas`: files/s with 1, 2 and 3 replicas, and with 1, 2 and 3 clamd endpoints.

Two series on the bench corpus (bench.py's mix, clean under the test signatures):

- **replicas**: k `watcher run` (k = 1, 2, 3), each on a host of its own (tests/harness/hosts.py:
  a network and mount namespace) with its own clamd on a private unix socket (FILDES), all
  sharing one uploads/processed/quarantine tree through bind mounts, polling it;
- **endpoints**: one `watcher run` with ``CLAMAV_HOST`` listing k clamd (k = 1, 2, 3) on
  127.0.0.1-3 over TCP (INSTREAM): the pool of watcher/endpoints.py.

Every clamd has MaxThreads 4 and DisableCache yes. The arms alternate within each round (forward,
then backward: a shared machine's weather hits each arm alike) and the table gives medians: the
rate from the first delivery to the last (the corpus moved in at once; the daemons' own log
times: what polling takes to notice the burst, the same in every arm, is left out, and shown
apart as the drain rate from the move to the last delivery) and CPU per file from /proc (the
daemons', with any scan processes; the clamds'). Root only (namespaces). Prints a table and
writes bench/results/replicas.json; docs/scaling.md explains the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import make_corpus
from benchlib import DELIVERED, RESULTS, move_all
from harness.clamd import Clamd
from harness.daemon import DaemonProcess, daemon_env
from harness.files import count_files
from harness.hosts import Host, missing_tools
from harness.proc import cpu_seconds, tree_cpu_seconds

DIRS = ("uploads", "processed", "quarantine")
COUNTS = (1, 2, 3)
# Polling, as on a network filesystem; short enough that noticing the burst is a small part of
# the drain, the same in every arm.
POLLING = {"WATCHER_OBSERVER": "polling", "WATCHER_POLL_INTERVAL_S": "0.5"}
COMMON = {
    "WATCHER_SETTLE_S": "0.5",
    "WATCHER_UPDATE_COMMAND": "",
    "WATCHER_HTTP_ADDR": "127.0.0.1:0",
    "WATCHER_LOG_LEVEL": "INFO",
}


def _kept(record: dict[str, Any]) -> bool:
    return str(record.get("event", "")).startswith("file.")


class Drain:
    """Daemons (ready) and their clamds: move the corpus in, time until all is delivered."""

    def __init__(self, daemons: list[DaemonProcess], clamds: list[Clamd], shared: Path) -> None:
        self.daemons, self.clamds, self.shared = daemons, clamds, shared

    def run(self, corpus: Path, files: int, timeout_s: float = 600) -> dict[str, float]:
        before = self._cpu_s()
        delivered_before = self._delivered()
        marks = [len(d.events.records) for d in self.daemons]
        started = move_all(corpus, self.shared / "uploads")
        deadline = started + timeout_s
        while self._delivered() - delivered_before < files:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self._delivered() - delivered_before}/{files} delivered")
            time.sleep(0.02)
        finished = time.monotonic()
        after = self._cpu_s()
        if count_files(self.shared / "processed") != files:  # a clean corpus: all processed
            raise RuntimeError(f"{count_files(self.shared / 'processed')}/{files} in processed")
        move_all(self.shared / "processed", corpus)  # the same files for the next run
        times = sorted(
            datetime.fromisoformat(r["time"]).timestamp()
            for daemon, mark in zip(self.daemons, marks, strict=True)
            for r in daemon.events.records[mark:]
            if r.get("event") in DELIVERED
        )
        return {
            "files_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "drain_files_per_s": files / (finished - started),
            "daemon_cpu_ms_per_file": 1000 * (after[0] - before[0]) / files,
            "clamd_cpu_ms_per_file": 1000 * (after[1] - before[1]) / files,
            "load_1min": os.getloadavg()[0],
        }

    def _cpu_s(self) -> tuple[float, float]:
        """CPU seconds so far: the daemons' (with any scan processes), the clamds'."""
        daemons = sum(tree_cpu_seconds(d.pid) for d in self.daemons)
        return daemons, sum(cpu_seconds(c.pid) for c in self.clamds)

    def _delivered(self) -> int:
        return sum(d.events.count(*DELIVERED) for d in self.daemons)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.terminate(timeout_s=60)


class Hosts:
    """Three simulated hosts, each with its clamd, for the whole run; `count` replicas per arm."""

    def __init__(self, base: Path) -> None:
        self.shared = base / "shared"
        for name in DIRS:
            (self.shared / name).mkdir(parents=True)
        self.hosts = [Host(f"host{n}", self.shared, base / "view").start() for n in COUNTS]
        self.clamds = [
            host.clamd(base / f"clamd-{n}", disable_cache=True).start()
            for n, host in enumerate(self.hosts)
        ]

    def start(self, count: int) -> Drain:
        daemons = []
        for host, clamd in list(zip(self.hosts, self.clamds, strict=True))[:count]:
            dirs = {name: host.data / name for name in DIRS} | {"state": host.private / "state"}
            env = daemon_env(
                dirs,
                clamd,
                CLAMAV_SOCKET=str(clamd.local_socket),
                WATCHER_DEFINITIONS_DIR=str(clamd.db),
                **POLLING,
                **COMMON,
            )
            daemons.append(DaemonProcess(env, prefix=host.prefix, keep=_kept).start(timeout_s=60))
        return Drain(daemons, self.clamds[:count], self.shared)

    def stop(self) -> None:
        for clamd in self.clamds:
            clamd.stop()
        for host in self.hosts:
            host.stop()


class Endpoints:
    """Three clamd on 127.0.0.1-3 over TCP; one daemon per arm with CLAMAV_HOST listing k."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.shared = base / "shared"
        for name in DIRS:
            (self.shared / name).mkdir(parents=True)
        self.clamds = [
            Clamd(base / f"clamd-{n}", disable_cache=True, tcp_host=f"127.0.0.{n}").start()
            for n in COUNTS
        ]

    def start(self, count: int) -> Drain:
        dirs = {name: self.shared / name for name in DIRS} | {"state": self.base / "state"}
        env = daemon_env(
            dirs,
            self.clamds[0],
            CLAMAV_SOCKET="",
            CLAMAV_HOST=",".join(c.endpoint for c in self.clamds[:count]),
            WATCHER_DEFINITIONS_DIR=str(self.clamds[0].db),
            **POLLING,
            **COMMON,
        )
        daemon = DaemonProcess(env, keep=_kept).start(timeout_s=60)
        return Drain([daemon], self.clamds[:count], self.shared)

    def stop(self) -> None:
        for clamd in self.clamds:
            clamd.stop()


def alternate(
    start: Callable[[int], Drain], corpus: Path, files: int, rounds: int, name: str
) -> dict[int, list[dict[str, float]]]:
    """Each count once per round, forward then backward (1 2 3 3 2 1 ...)."""
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in COUNTS}
    for n in range(rounds):
        for count in COUNTS if n % 2 == 0 else COUNTS[::-1]:
            os.sync()  # the corpus just moved must not be flushed during the drain
            drain = start(count)
            try:
                runs[count].append(drain.run(corpus, files))
            finally:
                drain.stop()
            print(f"{name} {count} round {n}: {runs[count][-1]}", flush=True)
    return runs


def medians(runs: dict[int, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        str(count): {key: statistics.median(run[key] for run in r) for key in r[0]}
        | {"runs": len(r)}
        for count, r in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if missing_tools():
        raise SystemExit(f"the host simulation needs {missing_tools()} (make hosts-deps, root)")

    base = Path(tempfile.mkdtemp(prefix="watcher-replicas-bench-", dir="/var/tmp"))
    results: dict[str, Any] = {"cores": os.cpu_count(), "clamd_threads": 4}
    try:
        corpus = base / "corpus"
        corpus_bytes = make_corpus(corpus, args.files)
        results["corpus"] = {"files": args.files, "mb": round(corpus_bytes / 1e6, 1)}
        print(f"corpus: {args.files} files, {corpus_bytes / 1e6:.1f} MB", flush=True)
        setups: dict[str, Callable[[Path], Hosts | Endpoints]] = {
            "replicas": Hosts,
            "endpoints": Endpoints,
        }
        for series, setup in setups.items():
            arms = setup(base / series)
            try:
                runs = alternate(arms.start, corpus, args.files, args.rounds, series)
                results[series] = medians(runs)
            finally:
                arms.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(
        "\n| | files/s | drain files/s | daemon CPU ms/file | clamd CPU ms/file | load |"
        "\n|---|---|---|---|---|---|"
    )
    for series, label in (("replicas", "replica"), ("endpoints", "clamd endpoint")):
        for count, r in results[series].items():
            plural = "s" if count != "1" else ""
            print(
                f"| {count} {label}{plural} | {r['files_per_s']:.0f} "
                f"| {r['drain_files_per_s']:.0f} | {r['daemon_cpu_ms_per_file']:.2f} "
                f"| {r['clamd_cpu_ms_per_file']:.2f} | {r['load_1min']:.1f} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
