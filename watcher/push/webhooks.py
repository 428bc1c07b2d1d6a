"""Webhooks: each final verdict POSTed as signed JSON to the app, from the store's outbox.

Events are written to the outbox in the same transaction as their verdicts
(watcher/recording.py); this sender, one thread, delivers them: oldest first, per URL, each
POST signed, retried with exponential backoff (1 s, 2 s, 4 s ... up to
WATCHER_WEBHOOK_MAX_BACKOFF_S) across restarts, until WATCHER_WEBHOOK_MAX_ATTEMPTS, then kept
as a dead letter (`webhook.dead`). A URL that fails holds back its other events until its
backoff is over (one request probes it), so a dead receiver costs one request per backoff,
and never anything on the scanning path: scanning only writes the outbox.

Delivery is at least once: the receiver deduplicates by the event's id (the idempotency key,
the same on every attempt). Signature (headers):

    Watcher-Event-Id:   <id>                 e.g. v-20261128T221500Z-3f9a1c2b7d4e
    Watcher-Timestamp:  <unix seconds>       the attempt's time
    Watcher-Signature:  v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A receiver recomputes the HMAC over the raw body, compares in constant time, refuses a
timestamp more than a few minutes away from its clock (a replay), and ignores an id it has
already processed (a redelivery, or a replay within the window).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import SplitResult, urlsplit

from watcher import __version__
from watcher.errors import StoreUnavailable
from watcher.logs import emit
from watcher.store import OutboxEvent, VerdictRecord, VerdictStore, target_id

BATCH = 50
BASE_BACKOFF_S = 1.0
IDLE_WAIT_S = 1.0  # an event another process (a scan process) wrote is seen this late at most
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(
    key: bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """A receiver's check (the Node example does the same): signature and timestamp."""
    try:
        timestamp = int(headers["Watcher-Timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), headers.get("Watcher-Signature", ""))


def shown(url: str) -> str:
    """A URL for the log: no credentials, no query (either may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookSender:
    def __init__(
        self,
        store: VerdictStore,
        urls: Sequence[str],
        key: bytes,
        max_attempts: int = 20,
        max_backoff_s: float = 3600.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.urls = {target_id(url): url for url in urls}
        self._key = key
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._conns: dict[str, http.client.HTTPConnection] = {}  # kept alive, per target
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held_until: dict[str, float] = {}  # target -> when it may be tried again
        self._down_since: dict[str, float] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watcher-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def recorded(self, record: VerdictRecord) -> None:
        """Recorder listener: new events may be waiting (cheap; on the committer's thread)."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        locked = False
        while not self._stop.is_set():
            self._wake.clear()
            wait_s = IDLE_WAIT_S  # while another daemon on the same store is the sender
            try:
                # Asked each round: a database's lock may have gone with its session.
                locked = self.store.lock_sender()
                if locked:
                    for target in self.urls:
                        self._send_due(target)
                    wait_s = self._wait_s()
            except StoreUnavailable:  # logged by the store, once per outage
                pass
            except Exception:  # the store is failing otherwise: never die, try again soon
                emit("webhook.error", exception=True)
            self._wake.wait(wait_s)
        for conn in self._conns.values():
            conn.close()
        if locked:
            self.store.unlock_sender()

    def _wait_s(self) -> float:
        now, wake_at = self.clock(), self.clock() + IDLE_WAIT_S
        for target in self.urls:
            due = self.store.next_due_at(target)
            if due is not None:
                wake_at = min(wake_at, max(due, self._held_until.get(target, 0.0)))
        return max(0.01, wake_at - now)

    def _send_due(self, target: str) -> None:
        while not self._stop.is_set():
            now = self.clock()
            if self._held_until.get(target, 0.0) > now:
                return
            events = self.store.due(target, now, BATCH)
            sent: list[int] = []
            try:
                for event in events:
                    if self._stop.is_set() or not self._attempt(target, event):
                        return
                    sent.append(event.id)
            finally:
                if sent:  # one transaction for the batch: a crash sends these again
                    self.store.delivered(sent)
            if len(events) < BATCH:
                return

    def _attempt(self, target: str, event: OutboxEvent) -> bool:
        url = self.urls[target]
        error = self._post(url, event)
        now = self.clock()
        if error is None:
            since = self._down_since.pop(target, None)
            if since is not None:
                down_s = round(now - since, 3)
                emit("webhook.receiver_up", target=target, url=shown(url), down_s=down_s)
            return True
        attempts = event.attempts + 1
        if attempts >= self.max_attempts:
            self.store.dead(event.id, now, error)
            self._down(target, url, now, error)
            emit(
                "webhook.dead",
                id=event.key,
                target=target,
                url=shown(url),
                attempts=attempts,
                error=error,
            )
        else:
            delay_s = self.backoff_s(attempts)
            self.store.failed(event.id, now + delay_s, error)
            self._held_until[target] = now + delay_s
            self._down(target, url, now, error)
        return False

    def _down(self, target: str, url: str, now: float, error: str) -> None:
        if target not in self._down_since:
            self._down_since[target] = now
            emit("webhook.receiver_down", target=target, url=shown(url), reason=error)

    def backoff_s(self, attempts: int) -> float:
        """1 s, 2 s, 4 s ... capped, less up to a fifth at random (receivers coming back are
        not all hit at once by every sender)."""
        delay = min(self.max_backoff_s, BASE_BACKOFF_S * 2.0 ** min(attempts - 1, 30))
        return delay * (1 - 0.2 * random.random())  # noqa: S311 - jitter, not a secret

    def _post(self, url: str, event: OutboxEvent) -> str | None:
        """None on a 2xx answer, else why not."""
        body = event.body.encode()
        timestamp = int(self.clock())
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"watcher/{__version__}",
            "Watcher-Event-Id": event.key,
            "Watcher-Timestamp": str(timestamp),
            "Watcher-Signature": sign(self._key, timestamp, body),
            "Watcher-Attempt": str(event.attempts + 1),
        }
        if parts.username or parts.password:
            userinfo = f"{parts.username or ''}:{parts.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo).decode()
        target = target_id(url)
        conn = self._conns.pop(target, None)  # kept alive from the last event, if any
        reused = conn is not None
        while True:
            conn = conn or self._connect(parts)
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read(64 * 1024)
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                if reused:  # the receiver closed an idle connection: not a failure
                    conn, reused = None, False
                    continue
                return f"{type(err).__name__}: {err}"
            if response.will_close:
                conn.close()
            else:
                self._conns[target] = conn
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"

    def _connect(self, parts: SplitResult) -> http.client.HTTPConnection:
        secure = parts.scheme == "https"
        connection = http.client.HTTPSConnection if secure else http.client.HTTPConnection
        return connection(parts.hostname or "", parts.port, timeout=self.timeout_s)
