"""Daemon CPU per file, this checkout against another revision: `python bench/code_ab.py`.

Both source trees drain the same corpus (the bench's mixed files) into a `watcher run` of their
own on one clamd (4 threads, DisableCache yes, the test signatures), alternating ABBA round
after round: the machine is shared and its speed drifts from one minute to the next, so only
runs taken side by side compare, and only their medians. The figure is the daemon's CPU (all
threads, user + system, from /proc) per file while the corpus drains; clamd's is printed beside
it, and files/s for the record only (it moves with whatever else runs here). `--together`
runs both arms at the same time in each round instead (each on its own copy of the corpus):
the two then share the machine's weather minute by minute, at the price of competing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import make_corpus
from benchlib import RESULTS, ROOT, Watcher, bench_clamd, export, move_all
from harness.clamd import Clamd
from harness.files import count_files
from harness.proc import cpu_seconds


def drain(source: Path, clamd: Clamd, corpus: Path, run: Path, files: int) -> dict[str, float]:
    """One `watcher run` from `source` drains the corpus (then it is moved back)."""
    daemon = Watcher(run, clamd, PYTHONPATH=str(source))
    try:
        os.sync()  # the last round's deliveries must not be flushed during this one
        before = cpu_seconds(daemon.pid), cpu_seconds(clamd.pid)
        started = move_all(corpus, daemon.uploads)
        finished = daemon.wait_delivered(files, 600)
        daemon_s, clamd_s = cpu_seconds(daemon.pid) - before[0], cpu_seconds(clamd.pid) - before[1]
        if count_files(daemon.processed) != files:  # a clean corpus: nothing refused
            raise RuntimeError(f"{source}: {count_files(daemon.processed)}/{files} delivered")
        move_all(daemon.processed, corpus)
    finally:
        daemon.stop()
    shutil.rmtree(run, ignore_errors=True)
    return {
        "daemon_cpu_ms_per_file": 1000 * daemon_s / files,
        "clamd_cpu_ms_per_file": 1000 * clamd_s / files,
        "files_per_s": files / (finished - started),
    }


def drain_together(
    sources: dict[str, Path], clamd: Clamd, corpora: dict[str, Path], base: Path, files: int
) -> dict[str, dict[str, float]]:
    """Both arms at once, each on its own copy of the corpus and its own directories, on the
    one clamd: whatever else the machine does meanwhile weighs on both alike."""
    daemons = {arm: Watcher(base / arm, clamd, PYTHONPATH=str(sources[arm])) for arm in sources}
    try:
        os.sync()
        before = {arm: cpu_seconds(d.pid) for arm, d in daemons.items()}
        movers = [
            threading.Thread(target=move_all, args=(corpora[arm], daemons[arm].uploads))
            for arm in sources
        ]
        started = time.monotonic()
        for mover in movers:
            mover.start()
        for mover in movers:
            mover.join()
        results = {}
        for arm, daemon in daemons.items():
            finished = daemon.wait_delivered(files, 600)
            results[arm] = {
                "daemon_cpu_ms_per_file": 1000 * (cpu_seconds(daemon.pid) - before[arm]) / files,
                "files_per_s": files / (finished - started),
            }
        for arm, daemon in daemons.items():
            if count_files(daemon.processed) != files:
                raise RuntimeError(f"{arm}: {count_files(daemon.processed)}/{files} delivered")
            move_all(daemon.processed, corpora[arm])
    finally:
        for daemon in daemons.values():
            daemon.stop()
    shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", default="main", help="git revision (the A arm)")
    parser.add_argument("--source", type=Path, help="a source tree for the A arm instead")
    parser.add_argument(
        "--after",
        help="git revision or source tree for the B arm (default: this checkout as it is)",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument(
        "--together",
        action="store_true",
        help="run both arms at once in each round (each on its own copy of the corpus)",
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="watcher-code-ab-", dir="/var/tmp"))
    old = args.source or export(args.compare, base / "old")
    new = ROOT
    if args.after:
        new = Path(args.after) if Path(args.after).is_dir() else export(args.after, base / "new")
    arms = {"before": old.resolve(), "after": new}
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    clamd = bench_clamd(base / "clamd")
    try:
        corpus = base / "corpus"
        make_corpus(corpus, args.files)
        if args.together:
            corpora = {arm: base / f"corpus-{arm}" for arm in arms}
            for arm in arms:
                make_corpus(corpora[arm], args.files)
        for n in range(args.rounds):
            if args.together:
                order = dict(list(arms.items())[:: 1 if n % 2 == 0 else -1])
                both = drain_together(order, clamd, corpora, base / f"run-{n}", args.files)
                for arm, run in both.items():
                    runs[arm].append(run)
                    print(f"round {n + 1} {arm} (together): {json.dumps(run)}", flush=True)
                continue
            for arm in list(arms) if n % 2 == 0 else list(arms)[::-1]:
                run = drain(arms[arm], clamd, corpus, base / f"run-{n}-{arm}", args.files)
                runs[arm].append(run)
                print(f"round {n + 1} {arm}: {json.dumps(run)}", flush=True)
    finally:
        clamd.stop()
        shutil.rmtree(base, ignore_errors=True)
    summary: dict[str, Any] = {
        arm: {key: statistics.median(r[key] for r in runs[arm]) for key in runs[arm][0]}
        for arm in arms
    }
    summary["runs"] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "code_ab.json").write_text(json.dumps(summary, indent=2))
    print(f"medians of {args.rounds} rounds, {args.files} files each:")
    for arm in arms:
        print(f"  {arm:<7} " + "  ".join(f"{k} {v:.3f}" for k, v in summary[arm].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
