"""Webhooks: every final verdict reaches the app's receiver, signed, exactly once by its id,
through receiver outages and daemon restarts; dead letters are alerted; scanning never waits."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import EICAR
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.http_client import get
from harness.receiver import Post, Receiver
from watcher.push.webhooks import sign, verify
from watcher.service import Service

Start = Callable[..., Service]
SECRET = "test-webhook-secret"


def checked(post: Post) -> dict[str, Any]:
    """The event, once its signature and id header are verified like a receiver would."""
    assert verify(SECRET.encode(), post.headers, post.body, time.time()), post.headers
    event: dict[str, Any] = post.json()
    assert post.headers["Watcher-Event-Id"] == event["id"]
    return event


def test_a_receiver_down_for_a_while_gets_every_event_once_after_it_returns(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Down while files are decided, across a SIGKILL and restart of the daemon: once it is
    back, each verdict arrives once (by idempotency key), signed, with its verdict."""
    receiver = Receiver()  # not started: nothing listens on its port
    env = {
        **subprocess_env,
        "WATCHER_WEBHOOK_URL": receiver.url,
        "WATCHER_WEBHOOK_SECRET": SECRET,
        "WATCHER_WEBHOOK_MAX_BACKOFF_S": "0.3",  # the minute-long outage, shortened
        "WATCHER_WEBHOOK_MAX_ATTEMPTS": "1000",
        "WATCHER_WEBHOOK_TIMEOUT_S": "2",  # the lease a SIGKILL may leave: 7 s
    }
    daemon = DaemonProcess(env).start()
    try:
        names = [f"clean-{n}.txt" for n in range(8)]
        for n, name in enumerate(names):
            (dirs["uploads"] / name).write_bytes(b"clean %d" % n)
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        daemon.events.wait_for("file.clean", count=len(names))
        daemon.events.wait_for("file.infected", path="bad.com")
        daemon.events.wait_for("webhook.receiver_down")
        daemon.kill()

        daemon.start()
        daemon.events.wait_for("webhook.receiver_down")  # still down after the restart
        receiver.start()
        posts = receiver.wait_for(len(names) + 1, timeout_s=30)
        daemon.events.wait_for("webhook.receiver_up")
        time.sleep(1.0)  # anything sent twice would arrive now
        events = [checked(p) for p in receiver.posts]
        ids = Counter(str(e["id"]) for e in events)
        assert len(posts) == len(receiver.posts) == len(ids) and set(ids.values()) == {1}
        files = {e["file"]["path"]: e["file"] for e in events}
        assert sorted(files) == sorted([*names, "bad.com"])
        assert files["bad.com"]["state"] == "infected" and files["bad.com"]["signature"]
        assert files["clean-3.txt"]["sha256"] == hashlib.sha256(b"clean 3").hexdigest()
        assert all(e["type"] == "file.verdict" for e in events)
        wait_until(lambda: _metric(daemon, "watcher_webhook_events_waiting") == 0.0, 10)
    finally:
        daemon.kill()
        receiver.stop()


def _metric(daemon: DaemonProcess, name: str) -> float | None:
    for line in get(daemon.http_address, "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_an_event_refused_every_time_becomes_a_dead_letter_alerted_and_counted(
    start_daemon: Start, dirs: dict[str, Path], events: Events, store_settings: dict[str, Any]
) -> None:
    """On each verdict store (the outbox's bookkeeping: attempts, backoff, dead letters)."""
    receiver = Receiver(status=500).start()
    try:
        daemon = start_daemon(
            **store_settings,
            webhook_url=receiver.url,
            webhook_secret=SECRET,
            webhook_max_attempts=3,
            webhook_max_backoff_s=0.1,
        )
        (dirs["uploads"] / "x.txt").write_bytes(b"x")
        (dead,) = events.wait_for("webhook.dead", timeout_s=30)
        assert dead["level"] == "ERROR" and dead["attempts"] == 3
        assert dead["error"] == "HTTP 500" and dead["url"] == receiver.url
        assert len(receiver.posts) == 3
        assert {p.headers["Watcher-Attempt"] for p in receiver.posts} == {"1", "2", "3"}
        assert len({p.headers["Watcher-Event-Id"] for p in receiver.posts}) == 1
        metrics = get(daemon, "/metrics").body.decode()
        assert "watcher_webhook_dead_letters 1.0" in metrics
        assert 'watcher_events_total{event="webhook.dead",level="ERROR"} 1.0' in metrics
    finally:
        receiver.stop()


def test_a_receiver_that_hangs_never_slows_scanning(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    receiver = Receiver(delay_s=5.0).start()
    try:
        start_daemon(webhook_url=receiver.url, webhook_secret=SECRET, webhook_timeout_s=20)
        started = time.monotonic()
        for n in range(20):
            (dirs["uploads"] / f"f{n}.txt").write_bytes(b"file %d" % n)
        events.wait_for("file.clean", count=20, timeout_s=30)
        assert time.monotonic() - started < 5  # the receiver has not answered once yet
        assert len(receiver.posts) == 0
    finally:
        receiver.stop()


def test_only_the_verdicts_asked_for_are_sent(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    receiver = Receiver().start()
    try:
        start_daemon(webhook_url=receiver.url, webhook_secret=SECRET, webhook_verdicts="infected")
        (dirs["uploads"] / "ok.txt").write_bytes(b"fine")
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        events.wait_for("file.clean", path="ok.txt")
        (post,) = receiver.wait_for(1)
        assert checked(post)["file"]["path"] == "bad.com"
        time.sleep(0.5)
        assert len(receiver.posts) == 1
    finally:
        receiver.stop()


def test_each_url_gets_each_event_and_the_secret_may_come_from_a_file(
    start_daemon: Start, dirs: dict[str, Path], tmp_path: Path
) -> None:
    first, second = Receiver().start(), Receiver().start()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    try:
        start_daemon(webhook_url=f"{first.url},{second.url}", webhook_secret_file=secret_file)
        (dirs["uploads"] / "both.txt").write_bytes(b"both")
        (a,) = first.wait_for(1)
        (b,) = second.wait_for(1)
        assert checked(a)["id"] == checked(b)["id"]
    finally:
        first.stop()
        second.stop()


def test_signatures_cover_the_timestamp_and_the_body() -> None:
    body = json.dumps({"id": "v-1"}).encode()
    now = int(time.time())
    headers = {"Watcher-Timestamp": str(now), "Watcher-Signature": sign(b"k", now, body)}
    assert verify(b"k", headers, body, now)
    assert not verify(b"other", headers, body, now)
    assert not verify(b"k", headers, body + b" ", now)
    assert not verify(b"k", {**headers, "Watcher-Timestamp": str(now + 1)}, body, now)
    assert not verify(b"k", headers, body, now + 301)  # a replay after the window


def test_with_scan_processes_every_process_verdict_is_pushed_and_notified(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """WATCHER_PROCESSES=3: the scan processes write their events to the shared outbox; the
    first process sends them all, and notifies of infected files whichever process found them."""
    hooks, notify = Receiver().start(), Receiver().start()
    env = {
        **subprocess_env,
        "WATCHER_PROCESSES": "3",
        "WATCHER_WEBHOOK_URL": hooks.url,
        "WATCHER_WEBHOOK_SECRET": SECRET,
        "WATCHER_NOTIFY_URLS": f"json://127.0.0.1:{notify.port}/notify",
        "WATCHER_NOTIFY_BATCH_S": "5",
    }
    daemon = DaemonProcess(env).start()
    try:
        names = [f"f{n:02}.txt" for n in range(12)] + [f"bad{n}.com" for n in range(6)]
        for name in names:
            body = EICAR + name.encode() if name.startswith("bad") else name.encode()
            (dirs["uploads"] / name).write_bytes(body)
        posts = hooks.wait_for(len(names), timeout_s=30)
        assert sorted(checked(p)["file"]["path"] for p in posts) == sorted(names)
        (message,) = notify.wait_for(1, timeout_s=30)
        assert message.json()["title"] == "watcher: 6 infected"
    finally:
        daemon.kill()
        hooks.stop()
        notify.stop()
