"""The soak's faults: what they are, and when each happens (seeded)."""

from __future__ import annotations

import random
from dataclasses import dataclass

SCAN_TIMEOUT_S = 3.0  # WATCHER_SCAN_TIMEOUT_S in the soak; a freeze lasts longer than this
BURST_FILES = 20_000
FAULTS = {
    "kill": "daemon SIGKILL, then restart",
    "clamd_restart": "clamd stopped, then started",
    "clamd_freeze": f"clamd SIGSTOP > scan timeout ({SCAN_TIMEOUT_S:g} s), then SIGCONT",
    "storage_full": "processed filesystem full",
    "peer": "second daemon on the same directories",
    "burst": f"burst of {BURST_FILES:,} files past inotify's queue",
}


@dataclass(order=True)
class Action:
    at_s: float
    kind: str
    value: float = 0.0


@dataclass
class Episode:
    kind: str
    start: float  # wall clock
    end: float = 0.0
    note: str = ""


# -- the schedule ---------------------------------------------------------------------------


def build_schedule(rng: random.Random, window_s: float, kills: int) -> list[Action]:
    """Every fault, at seeded times within the window; kills stop at 72 % (RSS: a long tail)."""
    actions: list[Action] = []
    kill_end = window_s * 0.72
    slot = (kill_end - 8) / kills
    for n in range(kills):
        at = 8 + n * slot + rng.uniform(0.2, 0.8) * slot
        actions.append(Action(at, "kill", rng.uniform(0.0, 1.5)))
    episodes = ["clamd_restart", "clamd_freeze", "storage_full"] * 2
    rng.shuffle(episodes)
    width, free_at = (window_s - 20) / len(episodes), 0.0
    for n, kind in enumerate(episodes):  # one after the other: each checked on its own
        duration = {
            "clamd_restart": rng.uniform(3, 10),
            "clamd_freeze": SCAN_TIMEOUT_S + rng.uniform(1, 4),
            "storage_full": rng.uniform(10, 18),
        }[kind]
        at = max(free_at + 3, 10 + n * width + rng.uniform(1, max(1.5, width - duration - 3)))
        free_at = at + duration
        begin, end = {
            "clamd_restart": ("clamd_stop", "clamd_start"),
            "clamd_freeze": ("freeze", "thaw"),
            "storage_full": ("fill", "free"),
        }[kind]
        actions += [Action(at, begin), Action(free_at, end)]
    for low, high in ((10, kill_end / 2 - 35), (kill_end / 2, kill_end - 35)):
        at = rng.uniform(low, max(low, high))
        actions += [Action(at, "peer_start"), Action(at + rng.uniform(15, 35), "peer_stop")]
        actions[-1].value = float(rng.random() < 0.5)  # 1: SIGKILL, 0: SIGTERM
    actions.append(Action(rng.uniform(0.15, 0.55) * window_s, "burst"))
    return sorted(actions)
