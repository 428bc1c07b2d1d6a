"""The soak's webhook receiver: every verdict the daemons push, checked against the uploads.

A loopback HTTP/1.1 server takes the daemons' POSTs as an app would: it checks each signature
(a POST that fails is counted `refused`, answered 401) and keeps each event by its id (the
idempotency key; an id seen again is counted `repeated`). It is taken down twice during the run
for 15-30 s (`outages`) while files go on being decided, so the outbox's retries across kills,
restarts and a second daemon are in the loop. At the end each upload must have had its verdict
pushed: one whose path has no event with its final state is an event lost.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from typing import Any

from harness.receiver import Receiver
from soak.corpus import Upload
from watcher.push.webhooks import verify

SECRET = b"soak-webhook-secret"
OUTAGES = 2


class WebhookReceiver:
    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()  # received, repeated, refused
        self._lock = threading.Lock()
        self._http = Receiver(answer=self.take)  # one port, kept across its outages

    @property
    def url(self) -> str:
        return self._http.url

    def env(self) -> dict[str, str]:
        return {
            "WATCHER_WEBHOOK_URL": self.url,
            "WATCHER_WEBHOOK_SECRET": SECRET.decode(),
            "WATCHER_WEBHOOK_MAX_BACKOFF_S": "2",  # back within seconds of an outage's end
            "WATCHER_WEBHOOK_MAX_ATTEMPTS": "1000",  # no dead letter in a soak
        }

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    def take(self, headers: dict[str, str], body: bytes) -> int:
        if not verify(SECRET, headers, body, time.time()):
            with self._lock:
                self.counts["refused"] += 1
            return 401
        event = json.loads(body)
        with self._lock:
            self.counts["received"] += 1
            if event["id"] in self.events:
                self.counts["repeated"] += 1
            self.events[event["id"]] = event
        return 200

    def outages(self, rng: random.Random, window_s: float, stop: threading.Event) -> list[str]:
        """Down twice, 15-30 s each, within the first 70 % of the window; returns notes."""
        notes, started = [], time.monotonic()
        for n in range(OUTAGES):
            at = window_s * 0.7 * (n + rng.random()) / OUTAGES
            length = rng.uniform(15, 30)
            if stop.wait(max(0.0, started + at - time.monotonic())):
                break
            self.stop()
            notes.append(f"webhook receiver down {length:.0f} s at {at:.0f} s")
            stop.wait(length)
            self.start()
        return notes

    def missing(self, uploads: list[Upload]) -> list[Upload]:
        """Uploads whose final verdict no event carried."""
        with self._lock:
            states: dict[bytes, set[str]] = {}
            for event in self.events.values():
                path = os.fsencode(event["file"]["path"])
                states.setdefault(path, set()).add(event["file"]["state"])
        wanted = {"infected", "unscannable"}
        return [
            u
            for u in uploads
            if not (states.get(u.rel, set()) & (wanted if u.infected else {"clean"}))
        ]

    def wait_complete(self, uploads: list[Upload], timeout_s: float) -> float:
        started = time.monotonic()
        while self.missing(uploads) and time.monotonic() - started < timeout_s:
            time.sleep(1.0)
        return time.monotonic() - started
