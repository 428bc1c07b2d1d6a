"""Scans in flight never exceed clamd's threads (the pipeline's ScanSlots), and every waiting
worker gets its turn."""

from __future__ import annotations

import threading
import time

from watcher.pipeline import ScanSlots


def test_at_most_count_holders_at_once_and_every_waiter_gets_a_turn() -> None:
    slots, lock = ScanSlots(3), threading.Lock()
    holding, most, done = 0, 0, 0

    def worker() -> None:
        nonlocal holding, most, done
        for _ in range(50):
            with slots:
                with lock:
                    holding += 1
                    most = max(most, holding)
                time.sleep(0.0005)  # a scan: the others must queue meanwhile
                with lock:
                    holding -= 1
        with lock:
            done += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert done == 8 and holding == 0
    assert most == 3
