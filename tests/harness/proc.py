"""A process's CPU and memory, read from /proc: what the benches and the rate tests measure."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """A process's children, every thread's (a thread may be the one that started one)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return sorted(found)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (scan processes of `watcher run`)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def rss_mb(pid: int) -> float:
    """Resident memory in MiB (0.0 if /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
