"""Operator notifications through Apprise (Slack, Teams, e-mail, ntfy, ... one URL each).

What an operator must hear about (`NOTIFIED`: infected and late-detected files, unscannable
files, stale definitions, failed updates, clamd down or untrusted) is taken from the daemon's
results (every scan process's) and from the first process's log events as they are emitted
(logs.watch_events: the jobs run there, and it watches clamd too), gathered, and sent as one
message: the first event waits up to WATCHER_NOTIFY_BATCH_S (10 s at most) for others, and no
two messages go out closer than WATCHER_NOTIFY_BATCH_S. A burst of 1,000 infected files is one
message with the count and the first few names, never 1,000 messages; memory holds counts and
`EXAMPLES` lines per kind.

Sending happens on this module's own thread: a slow or failing notification service never
delays scanning. A message Apprise could not send is logged (`notify.failed`) and dropped:
notifications are a convenience beside the log, the metrics and the webhooks, not a queue.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from watcher.logs import emit, watch_events
from watcher.pipeline import Result
from watcher.verdict import Outcome

GATHER_MAX_S = 10.0
# Told by the daemon's results (which carry the scan processes' too), not by the log.
FROM_RESULTS = {
    Outcome.INFECTED: "file.infected",
    Outcome.UNSCANNABLE: "file.unscannable",
    Outcome.HELD: "file.unscannable",
}
EXAMPLES = 10
# event -> (what one line says, is it a failure rather than a warning)
NOTIFIED: dict[str, tuple[str, bool]] = {
    "file.infected": ("infected files quarantined", True),
    "file.infected_late": (
        "DELIVERED files found infected later (the app may have served them)",
        True,
    ),
    "file.unscannable": ("files could not be scanned", False),
    "definitions.stale": ("virus definitions are stale", True),
    "definitions.update_failed": ("definition updates failed", False),
    "clamd.down": ("clamd is down: uploads wait", True),
    "clamd.untrusted": ("clamd fails its canaries: uploads wait", True),
}


class Notifier:
    def __init__(self, urls: Sequence[str], batch_s: float, apprise_obj: Any = None) -> None:
        self.batch_s = batch_s
        self.gather_s = min(batch_s, GATHER_MAX_S)
        self._apprise = apprise_obj or _apprise(urls)
        self._lock = threading.Condition()
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}
        self._first_at: float | None = None
        self._last_sent = 0.0
        self._stop = False
        self._unwatch: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self.sent = 0  # messages sent (for tests and metrics)

    def start(self) -> None:
        self._unwatch = watch_events(set(NOTIFIED) - set(FROM_RESULTS.values()), self._observe)
        self._thread = threading.Thread(target=self._run, name="watcher-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is gathered (within the timeout), then stop."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def observe_result(self, result: Result) -> None:
        """Daemon listener: infected and unscannable files, from every scan process."""
        name = FROM_RESULTS.get(result.outcome)
        if name is not None and not result.fields.get("repeat"):
            fields = {"path": result.rel, "signature": result.signature, "reason": result.reason}
            self._observe(name, fields)

    def _observe(self, name: str, extra: dict[str, Any]) -> None:
        """Runs on the emitting thread (logs.watch_events), so it only counts."""
        with self._lock:
            self._counts[name] += 1
            examples = self._examples.setdefault(name, [])
            if len(examples) < EXAMPLES:
                examples.append(_example(name, extra))
            if self._first_at is None:
                self._first_at = time.monotonic()
                self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._first_at is None and not self._stop:
                    self._lock.wait()
                if self._first_at is None:
                    return
                while not self._stop:
                    send_at = max(self._first_at + self.gather_s, self._last_sent + self.batch_s)
                    left = send_at - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                counts, examples = self._counts, self._examples
                self._counts, self._examples, self._first_at = Counter(), {}, None
                self._last_sent = time.monotonic()
            self._send(counts, examples)

    def _send(self, counts: Counter[str], examples: dict[str, list[str]]) -> None:
        import apprise

        total = sum(counts.values())
        title = "watcher: " + ", ".join(f"{n} {_short(name)}" for name, n in counts.items())
        lines = []
        for name, count in counts.items():
            lines.append(f"{count} x {NOTIFIED[name][0]}")
            lines.extend(f"  - {line}" for line in examples.get(name, []))
            if count > len(examples.get(name, [])):
                lines.append(f"  ... and {count - len(examples.get(name, []))} more")
        failure = any(NOTIFIED[name][1] for name in counts)
        kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.WARNING
        try:
            ok = bool(self._apprise.notify(body="\n".join(lines), title=title, notify_type=kind))
        except Exception as err:  # a plugin's bug must not end the thread
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "no notification service accepted it"
        if ok:
            self.sent += 1
            emit("notify.sent", events=total, counts=dict(counts))
        else:
            emit("notify.failed", events=total, reason=reason)


def _apprise(urls: Sequence[str]) -> Any:
    import apprise  # imported only when notifications are configured: it takes a while

    obj = apprise.Apprise()
    for url in urls:
        if not obj.add(url):
            from watcher.errors import ConfigError

            raise ConfigError("WATCHER_NOTIFY_URLS: Apprise does not accept one of the URLs")
    return obj


def _short(name: str) -> str:
    return {
        "file.infected": "infected",
        "file.infected_late": "detected late",
        "file.unscannable": "unscannable",
        "definitions.stale": "definitions stale",
        "definitions.update_failed": "update failed",
        "clamd.down": "clamd down",
        "clamd.untrusted": "clamd untrusted",
    }[name]


def _example(name: str, extra: dict[str, Any]) -> str:
    """One line for a message: names escaped (an uploaded name never reaches a chat raw)."""
    if name.startswith("file."):
        path = str(extra.get("path", "?")).encode("unicode_escape", "backslashreplace").decode()
        detail = extra.get("signature") or extra.get("reason") or ""
        return f"{path}" + (f" ({detail})" if detail else "")
    detail = extra.get("reason") or extra.get("cause") or extra.get("problem")
    if name == "definitions.stale":
        detail = f"{extra.get('age_s')} s old (max {extra.get('max_age_s')} s)"
    return str(detail or name)
