"""The soak's table: what went in, where it ended, which faults it survived, how long it took."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass

from soak.corpus import Upload
from soak.schedule import FAULTS, Episode
from soak.verify import CORRUPT, DUPLICATE, LEFTOVER, LOST, MISPLACED, Findings

FILE_PROBLEMS = (LOST, DUPLICATE, MISPLACED, CORRUPT)


@dataclass(frozen=True)
class Figures:
    """What a soak run measured: everything the table is made of, as plain data."""

    seed: int
    minutes: float
    uploads: list[Upload]
    episodes: list[Episode]
    delivered_at: dict[bytes, float]  # upload path -> wall clock of its first delivery event
    problems: list[tuple[str, str]]  # (kind, text): the run's failed checks
    notes: list[str]
    found: Findings  # the end state, checked (soak.verify)
    rss: dict[str, float]  # MB: first, last_start, end, peak; and last_lived_s
    webhooks: dict[str, int] | None = None  # soak.webhooks: uploads, ids, received, ... lost


def report(figures: Figures) -> None:
    found, rss = figures.found, figures.rss
    problems = figures.problems + found.problems
    count = Counter(kind for kind, _ in problems)
    rows = _files(figures.uploads, found, count) + _faults(figures.episodes)
    rows += _delays(figures.uploads, figures.delivered_at)
    if figures.webhooks is not None:
        w = figures.webhooks
        rows.append(
            (
                "webhook events: uploads / distinct ids / POSTs (again by id; refused)",
                f"{w['uploads']:,} / {w['ids']:,} / {w['received']:,} "
                f"({w['repeated']:,}; {w['refused']:,})",
            )
        )
        rows.append(
            ("webhook events lost (an upload whose verdict was never pushed)", str(w["lost"]))
        )
    rows.append(
        (
            "RSS: first daemon / last daemon start → end (peak of all)",
            f"{rss['first']:.0f} / {rss['last_start']:.0f} → {rss['end']:.0f} MB "
            f"({rss['peak']:.0f} MB); the last ran {rss['last_lived_s']:.0f} s",
        )
    )
    others = sum(n for kind, n in count.items() if kind not in (*FILE_PROBLEMS, LEFTOVER))
    rows.append(("other failed checks (events, daemon exits, RSS, drain)", str(others)))
    rows.append(("result", "FAIL" if problems else "PASS"))

    print(f"\nseed {figures.seed}, {figures.minutes:g} minutes, {os.cpu_count()} cores\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for note in figures.notes + found.notes:
        print(f"note: {note}")
    for kind, text in problems[:50]:
        print(f"PROBLEM {kind}: {text}")
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more problems")


def _files(uploads: list[Upload], found: Findings, count: Counter[str]) -> list[tuple[str, str]]:
    stream = sum(not u.burst for u in uploads)
    clean = sum(not u.infected for u in uploads)
    return [
        ("uploads (stream + burst)", f"{stream:,} + {len(uploads) - stream:,}"),
        ("clean → processed once, same bytes", f"{found.clean_ok:,} / {clean:,}"),
        (
            "infected → quarantine once, bytes + original_path",
            f"{found.infected_ok:,} / {len(uploads) - clean:,}",
        ),
        (
            "lost / duplicated / misplaced / corrupt",
            " / ".join(str(count[k]) for k in FILE_PROBLEMS),
        ),
        ("leftovers (temp files, orphan metadata, uploads, staging)", str(count[LEFTOVER])),
    ]


def _faults(episodes: list[Episode]) -> list[tuple[str, str]]:
    rows = []
    for kind, label in FAULTS.items():
        mine = [e for e in episodes if e.kind == kind]
        value = str(len(mine))
        if kind == "kill":
            starting = sum("starting up" in e.note for e in mine)
            value += f" ({starting} while starting up)" if starting else ""
        elif mine:
            value += " (" + "; ".join(_detail(e) for e in mine) + ")"
        rows.append((f"fault: {label}", value))
    return rows


def _detail(ep: Episode) -> str:
    length = f"{ep.end - ep.start:.1f} s" if ep.end else "still open"
    return f"{length}, {ep.note}" if ep.note else length


def _delays(uploads: list[Upload], delivered: dict[bytes, float]) -> list[tuple[str, str]]:
    rows = []
    for burst, label in ((False, "stream"), (True, "burst")):
        delays = sorted(
            (delivered[u.rel] - u.visible_at, u.seq)
            for u in uploads
            if u.burst == burst and u.rel in delivered
        )
        if not delays:
            continue
        values = [d for d, _ in delays]
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        rows.append(
            (
                f"delivery delay, {label}: p50 / p99 / worst",
                f"{statistics.median(values):.2f} / {p99:.1f} / {values[-1]:.1f} s "
                f"(worst: upload #{delays[-1][1]})",
            )
        )
    without = sum(u.rel not in delivered for u in uploads)
    rows.append(
        ("delivered with no delivery event (daemon killed before its log line)", str(without))
    )
    return rows
