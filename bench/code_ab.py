"""Daemon CPU per file, this checkout against another revision: `python bench/code_ab.py`.

Both source trees drain the same corpus (the bench's mixed files) into a `watcher run` of their
own on one clamd (4 threads, DisableCache yes, the test signatures), alternating ABBA round
after round: the machine is shared and its speed drifts from one minute to the next, so only
runs taken side by side compare, and only their medians. The figure is the daemon's CPU (all
threads, user + system, from /proc) per file while the corpus drains; clamd's is printed beside
it, and files/s for the record only (it moves with whatever else runs here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", default="main", help="git revision (the A arm)")
    parser.add_argument("--source", type=Path, help="a source tree for the A arm instead")
    parser.add_argument(
        "--after", help="git revision for the B arm (default: this checkout as it is on disk)"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=3000)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="watcher-code-ab-", dir="/var/tmp"))
    old = args.source or export(args.compare, base / "old")
    new = export(args.after, base / "new") if args.after else ROOT
    arms = {"before": old.resolve(), "after": new}
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    clamd = bench_clamd(base / "clamd")
    try:
        corpus = base / "corpus"
        make_corpus(corpus, args.files)
        for n in range(args.rounds):
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
